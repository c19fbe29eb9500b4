"""Copy detection on real photos: does an edited copy of an indexed photo find its original first?

Data (`bench.photo_tiles`, cached under bench-cache/photos, never in git): 512x512 textured photo
tiles in two splits by source photo (`main`, for tuning; `heldout`, other photos) and as many
smooth-gradient tiles (hard negatives). Every tile is indexed once. Queries are edited copies made
by `imgsim.evaluation.edits` (seeded, so every run sees the same copies):

- `mix` (every trained edit at once) of every tile: the headline P@1;
- each single edit (crop, rescale, colour, mirror, greyscale, JPEG) and each held-out edit (rotate,
  blur, heavy crop, aspect, overlay, border, WebP, PNG-8) of a fixed subset of tiles (the "copy"
  recipe never trains on these; the pretrained-trunk model's views include rotations, heavy crops,
  aspect changes, blur, overlays and borders, so for it they are not held out);
- `unseen3`: three edits no recipe trains on, combined in one copy (`imgsim.evaluation.unseen`:
  perspective, noise, pixelation, hue, stickers, a canvas, ...), then WebP, of the same subset;
- sets: `textured` (main tiles), `gradients` (main tiles + gradient tiles, queries from both),
  `heldout` (held-out photos).

Every embedding is scored the same way: cosine similarity, P@1 = share of queries whose nearest
indexed tile is their original, recall@10 likewise within the first ten. Baselines measured in the
same run: the pretrained trunk alone (`imgsim import-encoder --pretrained efficientnet-lite0`, at
224 px; `--no-trunk` leaves it out), raw pixels through the same preprocessing (`imgsim.data.decode`
at the model's size, centred on the database mean) and the hand-made invariant descriptor
(greyscale, mirror-symmetrised, per-image standardised 8x8 pixels).

    nice -n 10 .venv/bin/python -m bench.copydetect --baselines-only
    nice -n 10 .venv/bin/python -m bench.copydetect --run RUN          # a trained imgsim run
    nice -n 10 .venv/bin/python -m bench.copydetect --recipe auto --minutes 10 --json out.json

`--recipe` trains in-process (no Ray) with the library's recipe (`imgsim.training.recipes`) on the set's
own tiles, as `imgsim train` would on that collection, then scores the model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench import photo_tiles
from bench.common import CACHE as BENCH_CACHE
from imgsim.data.decode import decode_image
from imgsim.evaluation.edits import EDITS, HELD_OUT_EDITS, copy_rng, edit_bytes
from imgsim.evaluation.unseen import unseen_combo_bytes

CACHE = BENCH_CACHE / "photos"
SUBSET = 400  # tiles per single-edit query set (a fixed random subset)
Embed = Callable[[np.ndarray], np.ndarray]


# -- data -------------------------------------------------------------------------------------------


def tile_paths(root: Path, split: str) -> list[Path]:
    manifest = photo_tiles.build(root)
    return [root / rel for rel in manifest["splits"][split]]


def _decode_one(args: tuple[str, int, int]) -> np.ndarray:
    path, size, channels = args
    return decode_image(Path(path).read_bytes(), size, channels)


#: The query set of three never-trained edits combined (`imgsim.evaluation.unseen`).
UNSEEN3 = "unseen3"


def _copy_one(args: tuple[str, str, int, int, tuple[int, ...], int]) -> list[np.ndarray]:
    path, edit, seed, index, sizes, channels = args
    if edit == UNSEEN3:
        data = unseen_combo_bytes(Path(path).read_bytes(), copy_rng(seed + 7, index), k=3)
    else:
        data = edit_bytes(Path(path).read_bytes(), edit, copy_rng(seed, index))
    return [decode_image(data, size, channels) for size in sizes]


def _cached(path: Path, make: Callable[[], np.ndarray]) -> np.ndarray:
    if path.is_file():
        return np.load(path)
    arr = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)
    return arr


def _pool_map(fn: Callable, jobs: list) -> np.ndarray:
    with ProcessPoolExecutor(max_workers=2) as pool:
        return np.stack(list(pool.map(fn, jobs, chunksize=16)))


def originals(root: Path, split: str, size: int, channels: int) -> np.ndarray:
    """uint8 (N, C, S, S): every tile of `split` through `imgsim.data.decode.decode_image`."""
    paths = tile_paths(root, split)
    return _cached(
        root / "decoded" / f"{split}-{size}c{channels}.npy",
        lambda: _pool_map(_decode_one, [(str(p), size, channels) for p in paths]),
    )


def query_ids(n: int, edit: str, seed: int) -> np.ndarray:
    """Which tiles get a copy: all for `mix`, a fixed random subset of `SUBSET` for single edits."""
    if edit == "mix" or n <= SUBSET:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 99]).choice(n, SUBSET, replace=False))


#: Copies are decoded at all of these sizes in one pass (the edit is the slow part).
SIZES = (32, 64, 96, 128)


def copies(
    root: Path, split: str, edit: str, seed: int, size: int, channels: int
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 copies (Q, C, S, S), index of each copy's original tile in `split`)."""
    paths = tile_paths(root, split)
    ids = query_ids(len(paths), edit, seed)

    def file(s: int) -> Path:
        return root / "copies" / f"{split}-{edit}-s{seed}-{s}c{channels}.npy"

    if not file(size).is_file():
        sizes = tuple(s for s in sorted({size, *SIZES}) if not file(s).is_file())
        # copy of tile t uses generator (seed, t + offset): the same copy whatever else is measured
        offset = {"main": 0, "heldout": 100_000, "gradients": 200_000}[split]
        jobs = [(str(paths[t]), edit, seed, int(t) + offset, sizes, channels) for t in ids]
        with ProcessPoolExecutor(max_workers=2) as pool:
            made = list(pool.map(_copy_one, jobs, chunksize=16))
        for j, s in enumerate(sizes):
            _cached(file(s), lambda j=j: np.stack([m[j] for m in made]))
    return np.load(file(size)), ids


# -- scoring ----------------------------------------------------------------------------------------


def score(db: np.ndarray, q: np.ndarray, targets: np.ndarray, k: int = 10) -> dict[str, float]:
    """P@1 and recall@k of cosine search: query i's only relevant item is database item targets[i]."""
    dbn = F.normalize(torch.as_tensor(db, dtype=torch.float32), dim=1)
    qn = F.normalize(torch.as_tensor(q, dtype=torch.float32), dim=1)
    top = (qn @ dbn.t()).topk(min(k, len(dbn)), dim=1).indices.numpy()
    hit = top == np.asarray(targets)[:, None]
    return {"precision_at_1": float(hit[:, 0].mean()), "recall_at_10": float(hit.any(axis=1).mean())}


def raw_pixels(db: np.ndarray) -> Embed:
    """Raw pixels, centred on the database mean (searched by cosine)."""
    mean = db.reshape(len(db), -1).astype(np.float32).mean(0)
    return lambda x: x.reshape(len(x), -1).astype(np.float32) - mean


def handmade(x: np.ndarray) -> np.ndarray:
    """Greyscale, mirror-symmetrised, per-image standardised 8x8 pixels."""
    t = torch.as_tensor(x).float()
    grey = t.mean(1, keepdim=True)
    small = F.adaptive_avg_pool2d(grey, 8)
    sym = small + small.flip(-1)
    flat = sym.flatten(1)
    flat = (flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + 1e-6)
    return flat.numpy()


def evaluate(
    embed: Embed | Callable[[str], Embed],
    root: Path,
    size: int,
    channels: int,
    sets: tuple[str, ...] = ("textured", "gradients", "heldout"),
    edits: tuple[str, ...] = (*EDITS, UNSEEN3),
    seed: int = 0,
) -> dict[str, dict]:
    """{set: {"mix": {...}, "per_edit": {edit: {...}}, ...}} for one embedding function.

    `embed` is either a function of a uint8 batch or a factory `set name -> function` (for
    embeddings fitted on the database, such as raw pixels' centring)."""
    out: dict[str, dict] = {}
    for name in sets:
        splits = {"textured": ("main",), "gradients": ("main", "gradients"), "heldout": ("heldout",)}[name]
        db_parts = [originals(root, s, size, channels) for s in splits]
        db_arr = np.concatenate(db_parts)
        fn = embed(name) if _is_factory(embed) else embed
        db = fn(db_arr)
        result: dict = {"database": len(db_arr)}
        per_edit = {}
        for edit in edits if name != "gradients" else ("mix",):
            qs, targets, kinds = [], [], []
            base = 0
            for s, part in zip(splits, db_parts, strict=True):
                arr, ids = copies(root, s, edit, seed, size, channels)
                qs.append(arr)
                targets.append(ids + base)
                kinds.append(np.full(len(ids), s))
                base += len(part)
            q_emb = fn(np.concatenate(qs))
            targets_all = np.concatenate(targets)
            per_edit[edit] = score(db, q_emb, targets_all) | {"queries": len(targets_all)}
            if name == "gradients":
                kinds_all = np.concatenate(kinds)
                for s in splits:
                    sel = kinds_all == s
                    per_edit[f"mix ({s} queries)"] = score(db, q_emb[sel], targets_all[sel])
        result["precision_at_1"] = per_edit["mix"]["precision_at_1"]
        result["recall_at_10"] = per_edit["mix"]["recall_at_10"]
        result["per_edit"] = per_edit
        held = [per_edit[e]["precision_at_1"] for e in HELD_OUT_EDITS if e in per_edit]
        if held:
            result["held_out_edits_precision_at_1"] = float(np.mean(held))
        if UNSEEN3 in per_edit:
            result["unseen3_precision_at_1"] = per_edit[UNSEEN3]["precision_at_1"]
        out[name] = result
    return out


def pretrained_trunk(name: str = "efficientnet-lite0") -> Any:
    """The zero-training baseline: `imgsim import-encoder --pretrained NAME`'s encoder, as users get it."""
    import tempfile

    from imgsim.models import autoencoder as model_lib
    from imgsim.models.encoders import import_pretrained

    with tempfile.TemporaryDirectory(
        prefix="copydetect-trunk-"
    ) as d:  # the loaded encoder keeps no file open
        import_pretrained(name, Path(d) / "run")
        return model_lib.load(Path(d) / "run")


def _is_factory(fn: Callable) -> bool:
    return getattr(fn, "is_factory", False)


def raw_pixel_factory(root: Path, size: int, channels: int) -> Callable[[str], Embed]:
    def make(set_name: str) -> Embed:
        splits = {"textured": ("main",), "gradients": ("main", "gradients"), "heldout": ("heldout",)}[
            set_name
        ]
        return raw_pixels(np.concatenate([originals(root, s, size, channels) for s in splits]))

    make.is_factory = True  # type: ignore[attr-defined]
    return make


# -- printing ---------------------------------------------------------------------------------------


def table(rows: dict[str, dict[str, dict]]) -> str:
    """Markdown: one row per method, columns = headline P@1 per set, greyscale, mirror, held-out mean."""
    cols = [
        "textured",
        "grey",
        "mirror",
        "held-out edits",
        "unseen3",
        "gradients",
        "heldout photos",
        "heldout unseen3",
    ]
    lines = ["| method | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    for method, res in rows.items():
        t = res.get("textured", {})
        cells = [
            t.get("precision_at_1"),
            t.get("per_edit", {}).get("greyscale", {}).get("precision_at_1"),
            t.get("per_edit", {}).get("mirror", {}).get("precision_at_1"),
            t.get("held_out_edits_precision_at_1"),
            t.get("unseen3_precision_at_1"),
            res.get("gradients", {}).get("precision_at_1"),
            res.get("heldout", {}).get("precision_at_1"),
            res.get("heldout", {}).get("unseen3_precision_at_1"),
        ]
        lines.append(f"| {method} | " + " | ".join("" if c is None else f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def per_edit_table(rows: dict[str, dict[str, dict]], set_name: str = "textured") -> str:
    edits = [e for e in EDITS if any(e in r.get(set_name, {}).get("per_edit", {}) for r in rows.values())]
    lines = ["| method | " + " | ".join(edits) + " |", "| --- |" + " --- |" * len(edits)]
    for method, res in rows.items():
        pe = res.get(set_name, {}).get("per_edit", {})
        lines.append(
            f"| {method} | "
            + " | ".join(f"{pe[e]['precision_at_1']:.2f}" if e in pe else "" for e in edits)
            + " |"
        )
    return "\n".join(lines)


def _parse_overrides(pairs: list[str]) -> tuple[dict, dict]:
    recipe, augment = {}, {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        parsed = json.loads(value)
        parsed = tuple(parsed) if isinstance(parsed, list) else parsed
        if key.startswith("augment."):
            augment[key.removeprefix("augment.")] = parsed
        else:
            recipe[key] = parsed
    return recipe, augment


def run_recipe(a: argparse.Namespace, sets: tuple[str, ...]) -> dict[str, dict]:
    """Train in-process on the main tiles (and on main + gradients for that set), score each model."""
    from dataclasses import replace

    from bench import inproc
    from imgsim.models.autoencoder import ModelConfig
    from imgsim.training.recipes import get_recipe

    overrides, aug = _parse_overrides(a.set)
    recipe = get_recipe(a.recipe, **overrides)
    if aug:
        recipe = replace(recipe, augment=replace(recipe.augment, **aug))
    config = ModelConfig(
        image_size=a.size,
        channels=3,
        dim=a.dim,
        widths=tuple(int(w) for w in a.widths.split(",")),
        proj_dim=a.proj_dim,
        arch=a.arch,
        recon_size=a.recon_size if a.arch == "resnet" else 0,
        recipe=recipe.name,
    )
    label = a.label or f"{recipe.name} {a.arch} {a.size}px " + " ".join(a.set)
    train_size = recipe.train_image_size(config)
    out: dict[str, dict] = {}
    plans = [("main", tuple(s for s in sets if s != "gradients"))]
    if "gradients" in sets:
        plans.append(("main+gradients", ("gradients",)) if a.train_gradients else ("main", ("gradients",)))
    models: dict[str, object] = {}
    for train_on, eval_sets in plans:
        if not eval_sets:
            continue
        if train_on not in models:
            splits = train_on.split("+")
            images = torch.from_numpy(np.concatenate([originals(a.root, s, train_size, 3) for s in splits]))
            fit = torch.from_numpy(np.concatenate([originals(a.root, s, a.size, 3) for s in splits]))
            print(
                f"[copydetect] {label}: training on {train_on} ({len(images)} images at {train_size}px)",
                file=sys.stderr,
            )
            model, stats = inproc.train(
                images, config, recipe, steps=a.steps, minutes=a.minutes, seed=a.seed, fit_images=fit
            )
            print(f"[copydetect] {stats}", file=sys.stderr)
            if a.save:
                from imgsim.models import autoencoder as model_lib

                model_lib.save(model, a.save / train_on, extra={"train": stats, "recipe": recipe.to_dict()})
            models[train_on] = (model, stats)
        model, stats = models[train_on]
        res = evaluate(model.embed, a.root, a.size, 3, eval_sets, seed=a.seed)
        for k in res:
            res[k]["train"] = {"on": train_on, **stats, "recipe": recipe.to_dict(), "model": config.to_dict()}
        out.setdefault(label, {}).update(res)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=CACHE)
    p.add_argument("--sets", default="textured,gradients,heldout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baselines-only", action="store_true")
    p.add_argument("--baseline-size", type=int, default=32, help="raw pixels at this size (and the model's)")
    p.add_argument("--run", action="append", default=[], help="a trained imgsim run to score (repeatable)")
    p.add_argument(
        "--also-symmetric", action="store_true", help="also score each run's mirror-symmetric embedding"
    )
    p.add_argument("--json", type=Path, help="write every result here")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--no-trunk", action="store_true", help="leave out the pretrained trunk's baseline row")
    p.add_argument(
        "--recipe", help="train in-process with this imgsim.training.recipes recipe on the main tiles"
    )
    p.add_argument("--arch", default="resnet")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--widths", default="32,64,128,256")
    p.add_argument("--proj-dim", type=int, default=64)
    p.add_argument("--recon-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--minutes", type=float, default=None)
    p.add_argument(
        "--set", action="append", default=[], help="recipe field=value (JSON value); augment.X=value"
    )
    p.add_argument("--train-gradients", action="store_true", help="also train on main+gradients for that set")
    p.add_argument("--label", default=None)
    p.add_argument("--save", type=Path, help="save each trained model as a run here (RUN/model/model.pt)")
    p.add_argument("--threads", type=int, default=1, help="1 is far faster on a shared, busy machine")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    sets = tuple(a.sets.split(","))
    rows: dict[str, dict] = {}
    started = time.perf_counter()
    if not a.no_baselines:
        for size in sorted({a.baseline_size, 64}):
            rows[f"raw pixels {size}px"] = evaluate(
                raw_pixel_factory(a.root, size, 3), a.root, size, 3, sets, seed=a.seed
            )
        rows["hand-made 8x8"] = evaluate(handmade, a.root, 64, 3, sets, seed=a.seed)
        if not a.no_trunk:
            trunk = pretrained_trunk()
            rows["pretrained trunk alone"] = evaluate(
                trunk.embed, a.root, trunk.config.image_size, 3, sets, seed=a.seed
            )
        print(f"[copydetect] baselines in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if a.recipe:
        rows |= run_recipe(a, sets)
    if not a.baselines_only:
        from imgsim.models import autoencoder as model_lib

        for run in a.run:
            m = model_lib.load(run)
            rows[f"run {run}"] = evaluate(
                m.embed, a.root, m.config.image_size, m.config.channels, sets, seed=a.seed
            )
            if a.also_symmetric and not m.config.mirror_symmetric:
                from dataclasses import replace

                m.config = replace(m.config, mirror_symmetric=True)
                from imgsim.training.recipes import get_recipe

                db = torch.from_numpy(originals(a.root, "main", m.config.image_size, m.config.channels))
                get_recipe(m.config.recipe or "copy").fit_embedding(
                    m, [db[i : i + 256] for i in range(0, len(db), 256)]
                )
                rows[f"run {run} mirror-symmetric"] = evaluate(
                    m.embed, a.root, m.config.image_size, m.config.channels, sets, seed=a.seed
                )
    print(table(rows))
    print()
    print(per_edit_table(rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
