"""Generality: does the default `imgsim train` beat raw pixels beyond 28x28 greyscale?

Two labelled folders are built from material that installs offline, then each one goes through the
real CLI with its defaults (`imgsim train DATA/train --out RUN`, `imgsim index DATA/train --model
RUN`, `imgsim eval --model RUN --queries DATA/test --json`). The baselines, measured in the same
run: the pretrained trunk alone (`imgsim import-encoder --pretrained efficientnet-lite0`, indexed
and evaluated the same way), and raw pixels through the same preprocessing (`imgsim.data.decode` at
the model's size and channels), centred on the database mean, searched by cosine and scored by the
same `retrieval_metrics`.

- clipart: Oxygen icons (`apt-get install -y oxygen-icon-theme`), PNGs at 32-256 px, labelled by
  their context folder (actions, apps, devices, mimetypes, places, status). Identical files are kept
  once; every size of one icon name goes to the same split, so a query's own icon is never in the
  database. A category task: "which kind of icon is this?".
- photos: there is no labelled photo set offline, so this is a *near-duplicate* task. Each source
  photo is a class; its images are random crops (45-100 % of the shorter side, aspect 3:4 to 4:3,
  anywhere in the frame), mirrored half the time, with brightness/contrast/saturation jitter
  (+-15 %) and JPEG quality 60-95. Database and queries are different random views. Sources: the two
  scikit-learn sample photos, eight colour photos shipped inside the scikit-image wheel
  (`pip install --no-deps --target bench-cache/skdata scikit-image`, not a project dependency) and ten
  photographic KDE wallpapers (`apt-get install -y plasma-workspace-wallpapers`); missing ones are
  left out and reported.

    nice -n 19 .venv/bin/python -m bench.generality                   # defaults: about 5 minutes on 2 cores
    nice -n 19 .venv/bin/python -m bench.generality --epochs 1 --icons-per-class 100 --photo-db 20
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import sklearn
from PIL import Image, ImageEnhance, ImageOps

from bench.common import CACHE
from imgsim.data.decode import try_decode
from imgsim.data.sources import list_images, read_bytes
from imgsim.evaluation.metrics import retrieval_metrics
from imgsim.models import autoencoder as model_lib

ICON_ROOT = Path("/usr/share/icons/oxygen/base")
ICON_CONTEXTS = ("actions", "apps", "devices", "mimetypes", "places", "status")
ICON_SIZES = ("32x32", "48x48", "64x64", "128x128", "256x256")

SKLEARN_PHOTOS = Path(sklearn.__file__).parent / "datasets" / "images"
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png")
SKIMAGE_PHOTOS += ("motorcycle_left.png", "retina.jpg", "rocket.jpg")
WALLPAPER_ROOT = Path("/usr/share/wallpapers")
WALLPAPER_PHOTOS = ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow")
WALLPAPER_PHOTOS += ("FallenLeaf", "Grey", "OneStandsOut", "Path", "summer_1am")  # the rest are drawings


def _fresh(out: Path, params: dict) -> bool:
    """True if `out` was built with `params` (reuse it); otherwise empty it for a rebuild."""
    marker = out / ".params.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return True
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return False


def build_clipart(out: Path, per_class: int, seed: int) -> Path:
    """out/{train,test}/<context>/<size>_<name>.png from the Oxygen theme, about `per_class` each."""
    params = {"per_class": per_class, "seed": seed, "contexts": ICON_CONTEXTS, "sizes": ICON_SIZES}
    if _fresh(out, params):
        return out
    if not ICON_ROOT.is_dir():
        sys.exit(f"no icons at {ICON_ROOT}: apt-get install -y oxygen-icon-theme")
    seen: set[str] = set()
    rng = np.random.default_rng(seed)
    for context in ICON_CONTEXTS:
        by_name: dict[str, list[Path]] = {}
        for size in ICON_SIZES:
            for path in sorted((ICON_ROOT / size / context).glob("*.png")):
                digest = hashlib.sha1(path.read_bytes()).hexdigest()
                if digest not in seen:  # symlinks and copies: one file, one image
                    seen.add(digest)
                    by_name.setdefault(path.stem, []).append(path)
        names = sorted(by_name)
        taken = 0
        for name in (names[i] for i in rng.permutation(len(names))):
            if taken >= per_class:
                break
            split = "test" if int(hashlib.sha1(name.encode()).hexdigest(), 16) % 4 == 0 else "train"
            for path in by_name[name]:
                dest = out / split / context / f"{path.parent.parent.name}_{name}.png"
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest)
                taken += 1
    (out / ".params.json").write_text(json.dumps(params))
    return out


def photo_sources(skimage_data: Path) -> dict[str, Path]:
    """{class name: photo file} for every source photo present on this machine."""
    wanted = {p.stem: p for p in (SKLEARN_PHOTOS / "china.jpg", SKLEARN_PHOTOS / "flower.jpg")}
    wanted |= {Path(name).stem: skimage_data / name for name in SKIMAGE_PHOTOS}
    for name in WALLPAPER_PHOTOS:  # the largest rendition of each wallpaper
        images = sorted((WALLPAPER_ROOT / name / "contents" / "images").glob("*x*.*"))
        pixels = [math.prod(int(v) for v in p.stem.split("x")) for p in images]
        wanted[name] = images[int(np.argmax(pixels))] if images else WALLPAPER_ROOT / name
    missing = sorted(name for name, path in wanted.items() if not path.is_file())
    if missing:
        print(f"[generality] photos left out (not installed): {', '.join(missing)}", file=sys.stderr)
    return {name: path for name, path in wanted.items() if path.is_file()}


def random_view(img: Image.Image, rng: np.random.Generator, longer_side: int = 256) -> Image.Image:
    """A random crop of `img`, maybe mirrored, with brightness/contrast/saturation jitter."""
    w, h = img.size
    side, aspect = min(w, h) * rng.uniform(0.45, 1.0), rng.uniform(0.75, 4 / 3)
    cw, ch = min(w, side * math.sqrt(aspect)), min(h, side / math.sqrt(aspect))
    x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
    scale = longer_side / max(cw, ch)
    view = img.resize(
        (round(cw * scale), round(ch * scale)), Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch)
    )
    if rng.random() < 0.5:
        view = ImageOps.mirror(view)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        view = enhance(view).enhance(rng.uniform(0.85, 1.15))
    return view


def build_photos(out: Path, sources: dict[str, Path], per_split: dict[str, int], seed: int) -> Path:
    """out/{train,test}/<photo>/<i>.jpg: `per_split[split]` random views of every source photo."""
    params = {"sources": {k: str(v) for k, v in sources.items()}, "per_split": per_split, "seed": seed}
    if _fresh(out, params):
        return out
    for c, (name, path) in enumerate(sorted(sources.items())):
        with Image.open(path) as src:
            src.draft("RGB", (1600, 1600))
            img = src.convert("RGB")
        img.thumbnail((1600, 1600))  # plenty for 256 px views, and fast to crop
        for s, (split, n) in enumerate(per_split.items()):
            (out / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([seed, c, s, i])
                quality = int(rng.integers(60, 96))
                random_view(img, rng).save(out / split / name / f"{i:04d}.jpg", quality=quality)
    (out / ".params.json").write_text(json.dumps(params))
    return out


def imgsim(*args: str) -> dict:
    """Run the real `imgsim` command with --json; its JSON summary (stderr shown only on failure)."""
    cmd = [str(Path(sys.executable).parent / "imgsim"), *args, "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if "INFO" not in line]
        sys.exit(f"{' '.join(cmd)} failed (exit {done.returncode}):\n" + "\n".join(lines[-25:]))
    return json.loads(done.stdout.strip().splitlines()[-1])


def decode_folder(root: Path, image_size: int, channels: int) -> tuple[np.ndarray, list[str | None]]:
    """Raw pixels (N, C*S*S) float32 and labels of every decodable image under `root`."""
    rows, labels = [], []
    for ref in list_images(str(root)):
        arr, _ = try_decode(read_bytes(ref.path), image_size, channels)
        if arr is not None:
            rows.append(arr.reshape(-1).astype(np.float32))
            labels.append(ref.label)
    return np.stack(rows), labels


def model_size_baselines(run: Path, data: Path, k: int = 10) -> tuple[dict, dict]:
    """Two baselines on the model's preprocessing (`imgsim.data.decode` at its size and channels), each
    centred on the database mean and searched by cosine: raw pixels, and histograms of oriented
    gradients (`imgsim.models.hog`, the `denoise-hog` recipe's teacher). Each folder is decoded once."""
    import torch

    from imgsim.models.hog import orientation_histograms

    config = model_lib.load(run).config
    db, db_labels = decode_folder(data / "train", config.image_size, config.channels)
    q, q_labels = decode_folder(data / "test", config.image_size, config.channels)

    def centred_cosine(db_rows: np.ndarray, q_rows: np.ndarray) -> dict:
        mean = db_rows.mean(axis=0)
        return retrieval_metrics(q_rows - mean, q_labels, db_rows - mean, db_labels, k=k, metric="cosine")

    def histograms(flat: np.ndarray) -> np.ndarray:
        shape = (len(flat), config.channels, config.image_size, config.image_size)
        return orientation_histograms(torch.from_numpy(flat.reshape(shape))).numpy()

    return centred_cosine(db, q), centred_cosine(histograms(db), histograms(q))


def handmade_metrics(data: Path, k: int = 10) -> dict:
    """The hand-made invariant descriptor (`bench.copydetect.handmade`: greyscale, mirror-symmetrised,
    per-image standardised 8x8 pixels of the 64 px RGB decode), cosine KNN."""
    from bench.copydetect import handmade

    def features(root: Path) -> tuple[np.ndarray, list[str | None]]:
        flat, labels = decode_folder(root, 64, 3)
        return handmade(flat.reshape(len(flat), 3, 64, 64)), labels

    db, db_labels = features(data / "train")
    q, q_labels = features(data / "test")
    return retrieval_metrics(q, q_labels, db, db_labels, k=k, metric="cosine")


def trunk_alone(data: Path, run: Path) -> dict:
    """The zero-training column, through the CLI: import-encoder --pretrained, index, eval."""
    shutil.rmtree(run, ignore_errors=True)
    imgsim("import-encoder", "--pretrained", "efficientnet-lite0", "--out", str(run))
    imgsim("index", str(data / "train"), "--model", str(run))
    return imgsim("eval", "--model", str(run), "--queries", str(data / "test"))


def measure(name: str, data: Path, runs: Path, epochs: int | None, train_args: list[str]) -> dict:
    """Train, index and evaluate `data` with the CLI's defaults; the raw-pixel baseline beside it."""
    run = runs / name
    shutil.rmtree(run, ignore_errors=True)
    print(f"[generality] {name}: imgsim train / index / eval ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    trained = imgsim(
        "train",
        str(data / "train"),
        "--out",
        str(run),
        *(["--epochs", str(epochs)] if epochs else []),
        *train_args,
    )
    train_s = time.perf_counter() - started
    imgsim("index", str(data / "train"), "--model", str(run))
    ae = imgsim("eval", "--model", str(run), "--queries", str(data / "test"))
    trunk = trunk_alone(data, runs / f"{name}-trunk")
    raw, hog = model_size_baselines(run, data)
    hand = handmade_metrics(data)
    assert (raw["database"], raw["queries"]) == (ae["database"], ae["queries"]), (raw, ae)
    return {
        "data set": name,
        "n_db": ae["database"],
        "n_queries": ae["queries"],
        "classes": len({p.name for p in (data / "train").iterdir() if p.is_dir()}),
        "input": f"{trained['channels']}x{trained['image_size']}x{trained['image_size']}",
        "model": f"{trained['arch']}, {trained['recipe']}",
        "steps": trained["steps"],
        "P@10 autoencoder": ae["precision_at_k"],
        "P@10 pretrained trunk alone": trunk["precision_at_k"],
        "P@10 raw pixels": raw["precision_at_k"],
        "P@10 hand-made": hand["precision_at_k"],
        "P@10 oriented gradients": hog["precision_at_k"],
        "ratio": ae["precision_at_k"] / raw["precision_at_k"],
        "train s": train_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=CACHE / "gen-data", help="data sets and runs go here")
    p.add_argument("--sets", default="clipart,photos", help="comma-separated: clipart, photos")
    p.add_argument("--epochs", type=int, default=None, help="override `imgsim train`'s default (quick tries)")
    p.add_argument(
        "--train-args", default="", help='more `imgsim train` options, e.g. "--contrastive 0.5" (quick tries)'
    )
    p.add_argument("--icons-per-class", type=int, default=500, help="clip-art images per class (both splits)")
    p.add_argument("--photo-db", type=int, default=100, help="database views per source photo")
    p.add_argument("--photo-queries", type=int, default=20, help="query views per source photo")
    p.add_argument("--skimage-data", type=Path, default=CACHE / "skdata" / "skimage" / "data")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    builders = {
        "clipart": lambda out: build_clipart(out, a.icons_per_class, a.seed),
        "photos": lambda out: build_photos(
            out, photo_sources(a.skimage_data), {"train": a.photo_db, "test": a.photo_queries}, a.seed
        ),
    }
    rows = []
    for name in a.sets.split(","):
        print(f"[generality] {name}: building {a.work / name} ...", file=sys.stderr, flush=True)
        rows.append(
            measure(name, builders[name](a.work / name), a.work / "runs", a.epochs, a.train_args.split())
        )

    print("\nprecision@10, queries = test split, database = train split, cosine; ratio = AE / raw pixels")
    print(" | ".join(rows[0]))
    for row in rows:
        print(" | ".join(_cell(key, value) for key, value in row.items()))


def _cell(key: str, value: object) -> str:
    if key == "ratio":
        return f"{value:.2f}x"
    if key == "train s":
        return f"{value:.0f}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
