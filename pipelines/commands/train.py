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
        "what to train (default: chosen from a sample of DATA and the hardware, and printed)",
        f"Small images (median shorter side <= {SMALL_IMAGE_SIDE} px, e.g. Fashion-MNIST) get the small "
        "32 px autoencoder trained as a denoising autoencoder whose embedding also learns which images "
        "histograms of oriented gradients find close (recipe 'denoise-hog'; 'denoise' leaves that out). "
        "Larger images (photos) get the residual "
        "encoder at 64 px on a CPU (96 px on a GPU) trained with the 'copy' recipe: the decoder "
        "reconstructs each image from edited views (crops, mirror, greyscale, colour, blur) while an "
        "invariance term pulls the views' embeddings together, so an edited copy finds its original; "
        "its embedding is mirror-symmetric. Each flag below overrides its part of that choice. On a GPU, "
        "and on a CPU that computes bf16 natively (AVX-512 BF16 / AMX), training and embedding run in "
        "bf16 autocast, and the 'copy' recipe takes more steps in the same minutes; IMGSIM_CPU_BF16=0 "
        "keeps a CPU in float32.",
    )
    choice.add_argument(
        "--arch", choices=ARCHS, default=None, help="small: 32 px conv AE; resnet: residual, GeM"
    )
    choice.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        default=None,
        help="training objective: denoise-hog (small images), denoise (pixels only), copy (photos)",
    )
    choice.add_argument("--image-size", type=positive_int, default=None, help="images are resized to SxS")
    choice.add_argument(
        "--channels",
        type=channels,
        default=None,
        help="1 (greyscale), 3 (RGB) or auto (greyscale if a sample of DATA is)",
    )
    choice.add_argument("--dim", type=positive_int, default=None, help="embedding (bottleneck) size")
    length = p.add_argument_group("how long")
    length.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help=f"exactly E passes over the data (default: the recipe's length: 'copy' {RECIPES['copy'].steps} "
        f"steps of {RECIPES['copy'].batch_size} images on a CPU, 4x on a GPU; 'denoise' and 'denoise-hog' {t.epochs} passes, a "
        f"small data set repeated up to {t.min_steps} steps)",
    )
    length.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help=f"about N optimiser steps in all, in {t.epochs} epochs",
    )
    length.add_argument(
        "--batch-size", type=positive_int, default=None, help="global batch size (default: the recipe's)"
    )
    length.add_argument(
        "--lr", type=float, default=None, help="peak learning rate (AdamW, one-cycle; default: the recipe's)"
    )
    length.add_argument(
        "--contrastive",
        type=non_negative_float,
        default=None,
        metavar="W",
        help="weight of the invariance (InfoNCE) term between two edited views (default: the recipe's, "
        f"'copy' {RECIPES['copy'].nce_weight:g}, 'denoise' {RECIPES['denoise'].nce_weight:g}: README, how the defaults were chosen)",
    )
    where = p.add_argument_group("where")
    where.add_argument("--workers", type=positive_int, default=t.workers, help="Ray Train workers (DDP)")
    where.add_argument("--gpu", action="store_true", help="train on GPUs (bf16 autocast)")
    where.add_argument(
        "--gpus-per-worker",
        type=positive_float,
        default=1.0,
        metavar="F",
        help="GPUs per worker; below 1 packs several workers on one GPU (they then use gloo)",
    )
    where.add_argument(
        "--backend",
        choices=("nccl", "gloo"),
        default=None,
        help="torch.distributed backend (default: nccl with a whole GPU per worker, else gloo)",
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
    "Train the convolutional autoencoder with Ray Train's TorchTrainer (DDP across --workers). "
    "Labels are never used: the embedding is learned without supervision. Checkpoints go under "
    "RUN/checkpoints (resume with --resume); the model under RUN/model; the loss curve to "
    "RUN/plots/loss.png.",
    arguments,
    run,
    "pipelines.train",
    run_dir=lambda a: new_run(a.out),
)
