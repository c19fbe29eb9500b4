"""`imgsim train` and `python -m pipelines.train`: train the autoencoder with Ray Train."""

from __future__ import annotations

import argparse

from imgsim.config import DEFAULTS
from imgsim.console.arguments import (
    add_data,
    add_json,
    channels,
    non_negative_float,
    positive_float,
    positive_int,
    print_json,
)
from imgsim.console.command import Command, new_run


def arguments(p: argparse.ArgumentParser) -> None:
    from imgsim.models.autoencoder import ARCHS
    from imgsim.training.recipes import RECIPES, SMALL_IMAGE_SIDE

    t = DEFAULTS.train
    add_data(p)
    p.add_argument("--out", required=True, metavar="RUN", help="run directory to create or resume")
    choice = p.add_argument_group(
        "what to train (chosen from a sample of DATA and the hardware unless set, and printed)",
        f"Small images (median shorter side up to {SMALL_IMAGE_SIDE} px, such as Fashion-MNIST) get a "
        "small 32 px autoencoder that learns to rebuild images from noisy versions of them (recipe "
        "'denoise-hog', which also learns which images a classic shape descriptor finds alike; "
        "'denoise' learns from the pixels only). Larger images (photos) get a deeper encoder at 64 px "
        "on a CPU (96 px on a GPU) trained with the 'copy' recipe, so that an edited copy of an image "
        "(cropped, mirrored, greyscale, recoloured, blurred) lands next to its original. Each option "
        "below overrides its part of that choice. Where the hardware computes it fast (a GPU, or a "
        "recent CPU), training and embedding use 16-bit floats; IMGSIM_CPU_BF16=0 keeps a CPU at full "
        "precision.",
    )
    choice.add_argument(
        "--arch",
        choices=ARCHS,
        default=None,
        help="small: the 32 px autoencoder; resnet: a deeper encoder for photos; lite0: the pretrained "
        "EfficientNet-Lite0 trunk with a head and decoder trained on your images (224 px)",
    )
    choice.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        default=None,
        help="what training optimises: denoise-hog (small images), denoise (pixels only), copy (photos)",
    )
    choice.add_argument("--image-size", type=positive_int, default=None, help="images are resized to SxS")
    choice.add_argument(
        "--channels",
        type=channels,
        default=None,
        help="1 (greyscale), 3 (RGB) or auto (greyscale if a sample of DATA is)",
    )
    choice.add_argument("--dim", type=positive_int, default=None, help="embedding size")
    length = p.add_argument_group("how long (default: as long as the recipe says)")
    length.add_argument("--epochs", type=positive_int, default=None, help="exactly E passes over the data")
    length.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help=f"about N training steps in all, spread over {t.epochs} passes",
    )
    length.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="images per training step, across all workers (default: the recipe's)",
    )
    length.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe's)")
    length.add_argument(
        "--contrastive",
        type=non_negative_float,
        default=None,
        metavar="W",
        help="weight of the term that pulls two edited versions of an image together (default: the recipe's)",
    )
    where = p.add_argument_group("where")
    where.add_argument(
        "--workers",
        type=positive_int,
        default=t.workers,
        help="training processes (Ray Train workers), each taking a share of every batch",
    )
    where.add_argument("--gpu", action="store_true", help="train on GPUs")
    where.add_argument(
        "--gpus-per-worker",
        type=positive_float,
        default=1.0,
        metavar="F",
        help="GPUs per worker; below 1 puts several workers on one GPU",
    )
    where.add_argument(
        "--backend",
        choices=("nccl", "gloo"),
        default=None,
        help="how workers exchange gradients (default: nccl with a whole GPU per worker, else gloo)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in RUN")
    add_json(p, "print the summary as one JSON object")


def run(args: argparse.Namespace) -> int:
    from pipelines.train import train

    summary = train(
        args.data,
        args.out,
        epochs=args.epochs,
        steps=args.steps,
        image_size=args.image_size,
        channels=args.channels,
        dim=args.dim,
        batch_size=args.batch_size,
        lr=args.lr,
        workers=args.workers,
        use_gpu=args.gpu,
        gpus_per_worker=args.gpus_per_worker,
        backend=args.backend,
        resume=args.resume,
        nce_weight=args.contrastive,
        arch=args.arch,
        recipe=args.recipe,
    )
    if args.json:
        print_json(summary)
    else:
        print(
            f"trained {summary['epochs']} epochs ({summary['steps']:,} steps, {summary['arch']} "
            f"{summary['image_size']} px, recipe {summary['recipe']}) on {summary['images']} images "
            f"(final loss {summary['final_loss']:.4f}); model saved to {summary['model_dir']}"
        )
    return 0


COMMAND = Command(
    "train",
    "train the autoencoder on a folder or s3:// prefix (Ray Train)",
    "Train the autoencoder with Ray Train, data-parallel across --workers. "
    "Labels are never used: the embedding is learned without supervision. Checkpoints go under "
    "RUN/checkpoints (resume with --resume); the model under RUN/model; the loss curve to "
    "RUN/plots/loss.png.",
    arguments,
    run,
    "pipelines.train",
    run_dir=lambda a: new_run(a.out),
)
