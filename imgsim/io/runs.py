"""The run-directory layout: the one place that knows where a run keeps each file.

```
RUN/
  model/model.pt, model/config.json     the trained encoder: imgsim.models.autoencoder
  model/encoder.pt|.pt2, encoder.json   or an imported one (TorchScript | torch.export): imgsim.models.encoders
  checkpoints/train-state.json, <name>/ Ray Train checkpoints and what --resume needs
  plots/loss.png, plots/tsne.png, ...   plots
  index/                                replaced whole by each `imgsim index` (imgsim.io.atomic)
    embeddings.parquet                  one row per usable image; row number = result id
    files.parquet                       every listed input as the last run saw it (incremental)
    skipped.jsonl                       {"path", "reason"} per input that could not be used
    manifest.json                       data root, counts, model fingerprint, metric, index kind
    kmeans/, knn.faiss, meta.json       KMeans centroids and the KNN index (imgsim.index.knn)
  .index-staging-<model>/part-*.parquet embeddings of an `imgsim index` still running (or killed)
  duplicates/                           `imgsim duplicates` (imgsim.duplicates.groups)
    calibration.json                    the calibrated threshold, its precision and the model it fits
    state/                              pairs found and images searched, for incremental reruns
    duplicates.jsonl, .csv, .html       the groups (the default --out)
  logs/<command>-<date>-<time>/          Ray's logs of one command run (imgsim.console.output.RunLogs):
    driver.log                          what the driver printed besides progress (Ray's driver logs)
    ray/                                a local Ray's session logs: raylet, workers (worker-*.out/err)
    cluster.txt                         (a joined cluster) where the cluster keeps the workers' logs
```
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunPaths:
    """Paths inside a run directory."""

    root: Path

    def __init__(self, root: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "root", Path(root))

    # -- model --------------------------------------------------------------------------------------
    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def model_file(self) -> Path:
        return self.model_dir / "model.pt"

    @property
    def model_config(self) -> Path:
        """A readable copy of the model's configuration (model.pt holds the one that is used)."""
        return self.model_dir / "config.json"

    @property
    def encoder_manifest(self) -> Path:
        """An imported encoder's settings (format, input size, mean/std, dim, file hash)."""
        return self.model_dir / "encoder.json"

    def encoder_file(self, format: str) -> Path:
        """An imported encoder's file: "torchscript" → encoder.pt, "export" → encoder.pt2."""
        return self.model_dir / ("encoder.pt2" if format == "export" else "encoder.pt")

    # -- training -----------------------------------------------------------------------------------
    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def train_state(self) -> Path:
        """The Ray Train run name and settings that `--resume` continues."""
        return self.checkpoints_dir / "train-state.json"

    # -- plots and reports --------------------------------------------------------------------------
    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    @property
    def loss_plot(self) -> Path:
        return self.plots_dir / "loss.png"

    @property
    def tsne_plot(self) -> Path:
        return self.plots_dir / "tsne.png"

    @property
    def query_plot(self) -> Path:
        return self.plots_dir / "query.png"

    @property
    def demo_summary(self) -> Path:
        return self.root / "demo-summary.json"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    # -- index --------------------------------------------------------------------------------------
    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    @property
    def embeddings(self) -> Path:
        return self.index_dir / "embeddings.parquet"

    @property
    def files(self) -> Path:
        return self.index_dir / "files.parquet"

    @property
    def skipped(self) -> Path:
        return self.index_dir / "skipped.jsonl"

    @property
    def manifest(self) -> Path:
        return self.index_dir / "manifest.json"

    @property
    def kmeans_dir(self) -> Path:
        return self.index_dir / "kmeans"

    def index_staging(self, model_fingerprint: str) -> Path:
        """Where an `imgsim index` run with this model stages its embeddings until it completes."""
        return self.root / f".index-staging-{model_fingerprint}"

    def all_index_staging(self) -> list[Path]:
        return sorted(self.root.glob(".index-staging-*"))

    # -- duplicates ---------------------------------------------------------------------------------
    @property
    def duplicates_dir(self) -> Path:
        """`imgsim duplicates`' state, calibration and (by default) its reports."""
        return self.root / "duplicates"

    @property
    def duplicates_calibration(self) -> Path:
        """The calibrated duplicate threshold (imgsim.duplicates.groups.calibrate)."""
        return self.duplicates_dir / "calibration.json"

    @property
    def duplicates_state(self) -> Path:
        """Pairs found and nodes searched by the last run, swapped in whole (incremental reruns)."""
        return self.duplicates_dir / "state"
