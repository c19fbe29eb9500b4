"""Real-photo tiles for the copy-detection benchmark, built offline and cached outside git.

Sources are photographs that install offline (drawings and renders left out, by eye): KDE Plasma,
Lomiri/UKUI and MATE wallpapers (`apt-get install -y plasma-workspace-wallpapers ukui-wallpapers
lomiri-wallpapers mate-backgrounds`), the photos inside the scikit-image wheel (`pip install
--no-deps --target bench-cache/skdata scikit-image`, not a project dependency), scikit-learn's two
sample images and matplotlib's one, the example photos of OpenCV's documentation and KPhotoAlbum's
demo album (both extracted, not installed: `apt-get download opencv-doc kphotoalbum`, then `dpkg-deb
-x` each into bench-cache/debs/{opencv,kpa}). `bench-cache/` is `bench.common.CACHE`. Missing sources are left out and reported.

Each photo is cut into 512x512 tiles at several scales (full size, then x0.71, x0.5, ... down to a
shorter side of 512; a photo smaller than that gives one centre tile, scaled up); neighbouring
tiles overlap by a quarter of a side, so one photo yields tiles of its details and of its whole,
similar to each other but never copies. Tiles with little texture (smooth sky, blur)
are skipped: a tile is kept when the mean absolute gradient of its 128-px greyscale version is at
least `MIN_TEXTURE`. Per photo at most `MAX_PER_PHOTO` tiles (a random choice), so no photo dominates.

Two splits by *source photo*: `main` (recipe tuning) and `heldout` (other photos, to check that the
recipe generalises to photos it was not tuned on). `gradients`: as many smooth-gradient tiles
(linear, multi-stop and radial blends of random colours, slight noise) as `main`, the hard negatives.

    python -m bench.photo_tiles                    # into bench-cache/photos, ~2 minutes, once
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib
import numpy as np
import sklearn
from PIL import Image, ImageOps

from bench.common import CACHE

TILE = 512
STRIDE = 384  # neighbouring tiles share a quarter of a side: similar, but not copies
MIN_TEXTURE = 3.0  # mean |gradient| of the 128-px grey tile, in 0-255 units
MAX_PER_PHOTO = 80
VERSION = 1

WALLPAPERS = Path("/usr/share/wallpapers")
BACKGROUNDS = Path("/usr/share/backgrounds")
SKIMAGE = CACHE / "skdata" / "skimage" / "data"
SKLEARN = Path(sklearn.__file__).parent / "datasets" / "images"

#: name -> file; photographs only (chosen by eye from every wallpaper/background installed).
PLASMA = ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey")
PLASMA += ("Kite", "OneStandsOut", "Path", "Volna", "summer_1am")
BACKGROUND_FILES = (
    "Bridge_by_Sander_Klootwijk.jpg",
    "Dragonfly_by_Bolly.jpg",
    "Infinite-Sea_by_Aury88.jpg",
    "Kleiber_by_Lukas_Baubkus.jpg",
    "Picture_0B_by_freespace.jpg",
    "Picture_1A_by_freespace.jpg",
    "Wine_by_Jakkub_Mede.jpg",
    "aitzgorri_by_Aitzol_Berasategi.jpg",
    "analogpattern_by_Peter_Nerlich.jpg",
    "free_by_Peter_Nerlich.jpg",
    "friends_by_Aitzol_Berasategi.jpg",
    "life_by_Aitzol_Berasategi.jpg",
    "picosdeeuropa_by_Aitzol_Berasategi.jpg",
    "seeding_by_Clements_Engelhardt.jpg",
    "sunset_by_Aitzol_Berasategi.jpg",
)
MATE_NATURE = ("Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops")
MATE_NATURE += ("Storm", "TwoWings", "Wood", "YellowFlower")
SKIMAGE_FILES = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png")
SKIMAGE_FILES += ("grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png")
SKIMAGE_FILES += ("motorcycle_left.png", "retina.jpg", "rocket.jpg")
SKLEARN_FILES = ("china.jpg", "flower.jpg")
MATPLOTLIB = Path(matplotlib.get_data_path()) / "sample_data"
MATPLOTLIB_FILES = ("grace_hopper.jpg",)
#: Extracted, not installed: `apt-get download opencv-doc kphotoalbum` and `dpkg-deb -x` each into DEBS.
DEBS = CACHE / "debs"
OPENCV = DEBS / "opencv" / "usr/share/doc/opencv-doc/examples/data"
OPENCV_FILES = ("aero1.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "building.jpg", "butterfly.jpg")
OPENCV_FILES += ("fruits.jpg", "graf1.png", "home.jpg", "leuvenA.jpg", "left.jpg", "messi5.jpg", "orange.jpg")
OPENCV_FILES += ("squirrel_cls.jpg", "stuff.jpg", "licenseplate_motion.jpg", "ela_original.jpg", "board.jpg")
OPENCV_FILES += ("rubberwhale1.png", "basketball1.png", "box_in_scene.png")
KPHOTOALBUM = DEBS / "kpa" / "usr/share/kphotoalbum/demo"  # every *.jpg: a demo album of real photos

#: Source photos of the held-out split (never used to tune the recipe): a mix of kinds.
HELDOUT = frozenset(
    {"ColorfulCups", "EveningGlow", "Path", "Bridge_by_Sander_Klootwijk", "Wine_by_Jakkub_Mede"}
    | {"friends_by_Aitzol_Berasategi", "GreenMeadow", "LadyBird", "YellowFlower", "chelsea"}
    | {"coins", "motorcycle_left", "china", "aloeL", "baboon", "leuvenA", "squirrel_cls"}
    | {"grand_canyon_1", "grand_canyon_2", "grand_canyon_3", "skagen", "skagen_2", "spiff", "spiff_2"}
    | {"pool", "pool_2"}
)


def _largest_rendition(folder: Path) -> Path | None:
    images = [p for p in (folder / "contents" / "images").glob("*x*.*") if p.stem.count("x") == 1]
    sizes = []
    for p in images:
        try:
            sizes.append(math.prod(int(v) for v in p.stem.split("x")))
        except ValueError:
            sizes.append(0)
    return images[int(np.argmax(sizes))] if images else None


def photo_sources() -> dict[str, Path]:
    """{photo name: file} for every listed source photo installed on this machine."""
    wanted: dict[str, Path | None] = {n: _largest_rendition(WALLPAPERS / n) for n in PLASMA}
    wanted |= {Path(f).stem: BACKGROUNDS / f for f in BACKGROUND_FILES}
    wanted |= {n: BACKGROUNDS / "mate" / "nature" / f"{n}.jpg" for n in MATE_NATURE}
    wanted |= {Path(f).stem: SKIMAGE / f for f in SKIMAGE_FILES}
    wanted |= {Path(f).stem: SKLEARN / f for f in SKLEARN_FILES}
    wanted |= {Path(f).stem: MATPLOTLIB / f for f in MATPLOTLIB_FILES}
    wanted |= {Path(f).stem: OPENCV / f for f in OPENCV_FILES}
    wanted |= {p.stem: p for p in sorted(KPHOTOALBUM.glob("*.jpg"))}
    if not KPHOTOALBUM.is_dir():
        wanted["kphotoalbum demo album"] = None
    missing = sorted(n for n, p in wanted.items() if p is None or not p.is_file())
    if missing:
        print(f"[photo_tiles] left out (not installed): {', '.join(missing)}", file=sys.stderr)
    return {n: p for n, p in wanted.items() if p is not None and p.is_file()}


def texture(tile: Image.Image) -> float:
    """Mean absolute gradient of the 128-px greyscale tile (0-255 units)."""
    g = np.asarray(tile.convert("L").resize((128, 128), Image.Resampling.BILINEAR), dtype=np.float32)
    return float((np.abs(np.diff(g, axis=0)).mean() + np.abs(np.diff(g, axis=1)).mean()) / 2)


def photo_tiles(img: Image.Image) -> list[tuple[str, Image.Image]]:
    """(position name, 512x512 tile) at every scale from full size down to a shorter side of 512."""
    img = img.convert("RGB")
    w, h = img.size
    if min(w, h) < TILE:  # one tile: the centre square, scaled up
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2)
        return [("s0_0_0", img.resize((TILE, TILE), Image.Resampling.BICUBIC, box=box))]
    out = []
    level, scale = 0, 1.0
    while min(w, h) * scale >= TILE - 1:
        sw, sh = round(w * scale), round(h * scale)
        scaled = img if level == 0 else img.resize((sw, sh), Image.Resampling.LANCZOS)
        cols, rows = (sw - TILE) // STRIDE + 1, (sh - TILE) // STRIDE + 1
        x0, y0 = (sw - (cols - 1) * STRIDE - TILE) // 2, (sh - (rows - 1) * STRIDE - TILE) // 2
        for r in range(rows):
            for c in range(cols):
                box = (x0 + c * STRIDE, y0 + r * STRIDE, x0 + c * STRIDE + TILE, y0 + r * STRIDE + TILE)
                out.append((f"s{level}_{r}_{c}", scaled.crop(box)))
        level, scale = level + 1, scale / math.sqrt(2)
    return out


def gradient_tile(rng: np.random.Generator) -> Image.Image:
    """A smooth blend of 2-3 random colours: linear, multi-stop or radial, with slight noise."""
    yy, xx = np.mgrid[0:TILE, 0:TILE].astype(np.float32) / TILE
    kind = rng.integers(3)
    if kind == 2:  # radial
        cx, cy = rng.uniform(-0.2, 1.2, 2)
        t = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / rng.uniform(0.6, 1.5)
    else:
        angle = rng.uniform(0, 2 * math.pi)
        t = (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle)
        t = (t - t.min()) / (t.max() - t.min())
    t = np.clip(t, 0, 1)[..., None]
    colours = rng.integers(0, 256, (3, 3)).astype(np.float32)
    if kind == 1:  # three stops
        mid = rng.uniform(0.3, 0.7)
        a = np.clip(t / mid, 0, 1)
        b = np.clip((t - mid) / (1 - mid), 0, 1)
        arr = np.where(t < mid, colours[0] * (1 - a) + colours[1] * a, colours[1] * (1 - b) + colours[2] * b)
    else:
        arr = colours[0] * (1 - t) + colours[1] * t
    arr = arr + rng.normal(0, rng.uniform(0.5, 3.0), arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def build(out: Path, seed: int = 0) -> dict:
    """Write out/{main,heldout,gradients}/*.jpg and out/manifest.json (reused when already built)."""
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("version") == VERSION:
            return manifest
    sources = photo_sources()
    splits: dict[str, list[str]] = {"main": [], "heldout": [], "gradients": []}
    per_photo: dict[str, dict] = {}
    for i, (name, path) in enumerate(sorted(sources.items())):
        split = "heldout" if name in HELDOUT else "main"
        with Image.open(path) as src:
            tiles = photo_tiles(ImageOps.exif_transpose(src))
        kept = [(pos, t) for pos, t in tiles if texture(t) >= MIN_TEXTURE]
        rng = np.random.default_rng([seed, i])
        if len(kept) > MAX_PER_PHOTO:
            kept = [kept[j] for j in sorted(rng.choice(len(kept), MAX_PER_PHOTO, replace=False))]
        (out / split).mkdir(parents=True, exist_ok=True)
        for pos, tile in kept:
            rel = f"{split}/{name}_{pos}.jpg"
            tile.save(out / rel, quality=95)
            splits[split].append(rel)
        per_photo[name] = {"split": split, "tiles": len(tiles), "kept": len(kept), "file": str(path)}
        print(f"[photo_tiles] {name}: {len(kept)}/{len(tiles)} tiles -> {split}", file=sys.stderr)
    (out / "gradients").mkdir(parents=True, exist_ok=True)
    for j in range(len(splits["main"])):
        rel = f"gradients/gradient_{j:05d}.jpg"
        gradient_tile(np.random.default_rng([seed, 10_000, j])).save(out / rel, quality=95)
        splits["gradients"].append(rel)
    manifest = {"version": VERSION, "tile": TILE, "min_texture": MIN_TEXTURE, "seed": seed}
    manifest |= {"splits": {k: sorted(v) for k, v in splits.items()}, "photos": per_photo}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=CACHE / "photos")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    manifest = build(a.out, a.seed)
    print({k: len(v) for k, v in manifest["splits"].items()})


if __name__ == "__main__":
    main()
