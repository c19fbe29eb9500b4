"""`imgsim import-encoder`: a run from your own TorchScript or torch.export encoder."""

from __future__ import annotations

import argparse

from imgsim.config import PRETRAINED_TRUNKS
from imgsim.console.arguments import add_json, channels, positive_int, print_json
from imgsim.console.command import Command
from imgsim.errors import ImgsimError


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model_file",
        metavar="MODEL_FILE",
        nargs="?",
        help="a TorchScript file (torch.jit.save) or a torch.export file (.pt2, torch.export.save)",
    )
    p.add_argument(
        "--pretrained",
        choices=PRETRAINED_TRUNKS,
        metavar="NAME",
        help=f"instead of a file: a network pretrained on ImageNet, whose weights come with imgsim's "
        f"dependencies, used as it is (no training); one of: {', '.join(PRETRAINED_TRUNKS)}",
    )
    p.add_argument("--out", required=True, metavar="RUN", help="run directory to create")
    p.add_argument(
        "--image-size",
        type=positive_int,
        help="the model's input side S: images become SxS (needed with MODEL_FILE)",
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
    from imgsim.models.encoders import import_encoder, import_pretrained

    if args.pretrained:
        if args.model_file:
            raise ImgsimError("give MODEL_FILE or --pretrained NAME, not both")
        summary = import_pretrained(args.pretrained, args.out, force=args.force)
        if args.json:
            print_json(summary)
        else:
            print(
                f"made {summary['model_dir']}: the pretrained {args.pretrained} network alone "
                f"({summary['image_size']} px -> {summary['dim']}-d embeddings, no training)\n"
                f"next: imgsim index DATA --model {args.out}"
            )
        return 0
    if not args.model_file or not args.image_size:
        raise ImgsimError(
            "give MODEL_FILE with --image-size S, or --pretrained NAME (see imgsim import-encoder --help)"
        )
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
