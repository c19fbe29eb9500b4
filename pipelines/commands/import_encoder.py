"""`imgsim import-encoder`: a run from your own TorchScript or torch.export encoder."""

from __future__ import annotations

import argparse

from imgsim.console.arguments import add_json, channels, positive_int, print_json
from imgsim.console.command import Command


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model_file",
        metavar="MODEL_FILE",
        help="a TorchScript file (torch.jit.save) or a torch.export file (.pt2, torch.export.save)",
    )
    p.add_argument("--out", required=True, metavar="RUN", help="run directory to create")
    p.add_argument(
        "--image-size", required=True, type=positive_int, help="the model's input side S: images become SxS"
    )
    p.add_argument(
        "--channels",
        type=channels,
        default=None,
        help="1 (greyscale), 3 (RGB) or auto (what a .pt2 was exported for, else 3)",
    )
    p.add_argument(
        "--mean",
        type=float,
        nargs="+",
        metavar="M",
        default=None,
        help="subtracted from the [0, 1] pixels: one value, or one per channel (none: 0)",
    )
    p.add_argument(
        "--std",
        type=float,
        nargs="+",
        metavar="S",
        default=None,
        help="then divided by: one value, or one per channel (none: 1)",
    )
    p.add_argument("--force", action="store_true", help="replace a model RUN already holds")
    add_json(p, "print the summary as one JSON object")


def run(args: argparse.Namespace) -> int:
    from imgsim.models.encoders import import_encoder

    summary = import_encoder(
        args.model_file,
        args.out,
        image_size=args.image_size,
        channels=args.channels,
        mean=args.mean,
        std=args.std,
        force=args.force,
    )
    if args.json:
        print_json(summary)
        return 0
    s = summary
    batch = f"; fixed batch {s['batch_size']} (run in chunks)" if s["batch_size"] else ""
    print(
        f"imported {s['file']} ({s['format']}: {s['channels']}x{s['image_size']}x{s['image_size']} -> "
        f"{s['dim']}-d embeddings{batch}) into {s['model_dir']}\n"
        f"next: imgsim index DATA --model {args.out}"
    )
    return 0


COMMAND = Command(
    "import-encoder",
    "make a run from your own TorchScript or torch.export encoder",
    "Check MODEL_FILE (a TorchScript or torch.export .pt2 file mapping a float batch (N, C, S, S) in "
    "[0, 1], normalised by --mean/--std when given, to (N, D) vectors) on a probe batch, then store it "
    "as RUN's model: index, query, eval, serve and tsne then use it like a trained one. A file that "
    "is not such a model is refused and nothing is written. imgsim train refuses a run whose model "
    "was imported. The file's code runs when it is loaded: import only files you trust.",
    arguments,
    run,
)
