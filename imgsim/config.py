"""Every default in one place.

The CLI, the pipelines and the Serve app read their defaults from here, so a
default is changed once and the README/--help stay truthful.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: File extensions recognised as images (compared case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

#: Pillow's decompression-bomb guard: images with more pixels are refused.
MAX_IMAGE_PIXELS: int = 89_478_485  # Pillow's own default; kept explicit so it is never disabled.

#: Files larger than this are skipped without being read (bytes).
MAX_FILE_BYTES: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class PreprocessConfig:
    """How bytes become the model's input; stored with the model so queries match training."""

    image_size: int = 32
    channels: int = 1  # 1 (greyscale) or 3 (RGB); the CLI's "auto" picks from a sample of the data

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainConfig:
    """Training defaults (`imgsim train`)."""

    epochs: int = 8  # Fashion-MNIST (60K images): see docs/results.md
    # With the default length, small data sets are repeated within each epoch up to this many
    # optimiser steps in all (Fashion-MNIST's 8 epochs are 1,872 steps, untouched).
    min_steps: int = 1000
    dim: int = 64
    batch_size: int = 256
    lr: float = 2e-3
    # Weight of the auxiliary contrastive (InfoNCE) term; 0 = a plain denoising autoencoder, which
    # won at short budgets on Fashion-MNIST (docs/results.md, "Before `denoise-hog`"): the contrastive term costs a
    # second encoder/decoder pass per image.
    nce_weight: float = 0.0
    workers: int = 1
    use_gpu: bool = False
    seed: int = 0


#: KNN distances (imgsim.index.knn) and index kinds: "auto" = "ivf" from `IndexConfig.ivf_threshold` vectors.
METRICS = ("cosine", "l2")
INDEX_KINDS = ("auto", "exact", "ivf")


@dataclass(frozen=True)
class IndexConfig:
    """Embedding, clustering and KNN defaults (`imgsim index`)."""

    clusters: int = 4
    metric: str = "cosine"  # one of METRICS
    kind: str = "auto"  # one of INDEX_KINDS
    ivf_threshold: int = 200_000
    nprobe: int = 16
    embed_batch_size: int = 256
    concurrency: int = 2
    # Up to this many images to embed (a small re-index), `imgsim index` embeds them in its own
    # process instead of starting a Ray Data job, whose start-up costs more (docs/scaling.md);
    # never when it runs on a cluster (RAY_ADDRESS) or on a GPU.
    in_process_max: int = 10_000


@dataclass(frozen=True)
class SearchConfig:
    """Query defaults (`imgsim query`, `imgsim eval`, `Searcher`, `POST /search`)."""

    k: int = 10
    # URL queries from the user's own command line or Python may reach their own network; the HTTP
    # server refuses private addresses unless told otherwise (ServeConfig.allow_private_urls: SSRF).
    allow_private_urls: bool = True


@dataclass(frozen=True)
class DuplicatesConfig:
    """Duplicate finding and label-free evaluation defaults (`imgsim duplicates`, `eval --copies`)."""

    precision: float = 0.99  # target precision of the calibrated threshold (imgsim.evaluation.copies)
    calibration_copies: int = 300  # indexed images whose edited copies calibrate the threshold
    seed: int = 0
    # Neighbours kept per image by the range search: a cap on the work in a region so dense that
    # the threshold takes in hundreds of images (they could not form one duplicate group anyway).
    max_neighbours: int = 64
    # Geometric verification (imgsim.duplicates.verify) of candidate pairs of images large enough to have
    # keypoints: candidates reach out to the distance that holds this share of the calibration's
    # `mix` copies (every edit at once), among each image's `verify_neighbours` nearest.
    verify: bool = True
    candidate_recall: float = 0.99
    verify_neighbours: int = 10
    max_matches: int = 100  # matches returned for one query (`query --duplicates`, POST /duplicates)
    html_groups: int = 500  # groups drawn in duplicates.html (all of them are in the JSONL and CSV)


@dataclass(frozen=True)
class ReadConfig:
    """Reading an image's bytes from S3 (`imgsim.data.sources.read_bytes`): a failure that may pass (the
    store unreachable, a time-out, throttling) is tried again after a growing pause; one that
    still fails after `attempts` tries is skipped with its reason (and tried again by the next
    `imgsim index`). With these defaults the pauses add up to 0.5+1+2+4+8 = 15.5 s, enough to ride
    out a store that restarts."""

    attempts: int = 6
    backoff_s: float = 0.5  # pause before the second try; doubled after each failure
    max_backoff_s: float = 8.0


#: HTTP front ends for `imgsim serve --ingress` (serve/ingress.py).
INGRESS_CHOICES = ("auto", "haproxy", "proxy")
#: How results show an indexed image's path (`imgsim serve --paths`): relative to the indexed
#: folder, as indexed (the server's own absolute paths), or not at all (null).
#: Pretrained networks `imgsim import-encoder --pretrained` offers (`imgsim.models.trunk.TRUNKS`).
PRETRAINED_TRUNKS = ("efficientnet-lite0",)
PATHS_CHOICES = ("relative", "absolute", "none")


@dataclass(frozen=True)
class ServeConfig:
    """Serve defaults (`imgsim serve`)."""

    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    max_body_bytes: int = 10 * 1024 * 1024
    max_k: int = 100
    url_timeout_s: float = 10.0
    # URL queries may reach only globally routable addresses (imgsim.data.fetch); True lets them
    # reach this machine and its networks too (`imgsim serve --allow-private-urls`): local use only.
    allow_private_urls: bool = False
    ingress: str = "auto"  # one of INGRESS_CHOICES: "auto" = "haproxy" when installed (serve/ingress.py)
    paths: str = "relative"  # one of PATHS_CHOICES
    # Queries of more pixels are refused (413): an RGBA image this size decodes to 200 MB.
    max_query_pixels: int = 50_000_000
    # Queries of more than imgsim.data.decode.STRIP_REDUCE_PIXELS decode at most this many at once
    # per replica (the others wait), which bounds a replica's memory under concurrent large queries.
    large_decodes: int = 2
    max_json_bytes: int = 16 * 1024  # a JSON query holds a URL and k: a larger body is refused (413)
    # A request body not complete after this long is answered 408 (slow or stalled uploads).
    body_timeout_s: float = 30.0
    # Serve's whole-request limit (its HTTP proxy answers 408 beyond it), and idle keep-alive.
    request_timeout_s: float = 60.0
    keep_alive_timeout_s: float = 5.0


@dataclass(frozen=True)
class RuntimeConfig:
    """Starting or joining Ray (`pipelines.runtime.ensure_ray`)."""

    # Before joining a cluster, its address must accept a TCP connection within this long; Ray
    # itself retries a dead address for minutes. A stale `ray start` address file is then ignored
    # (a local Ray starts); an address the user gave (RAY_ADDRESS) fails in one line.
    cluster_answer_s: float = 2.0


@dataclass(frozen=True)
class Defaults:
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    duplicates: DuplicatesConfig = field(default_factory=DuplicatesConfig)
    read: ReadConfig = field(default_factory=ReadConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


DEFAULTS = Defaults()
