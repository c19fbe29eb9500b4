"""The copy edits: deterministic for a seed, each does what its description says, output decodes."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from imgsim.data.decode import decode_image
from imgsim.evaluation.edits import (
    EDITS,
    HELD_OUT_EDITS,
    TRAINED_EDITS,
    apply_edit,
    copy_rng,
    describe_edits,
    edit_bytes,
    edits_table,
)


def photo(w: int = 320, h: int = 240, seed: int = 0) -> Image.Image:
    """A colourful, textured, asymmetric test image (smooth gradients plus blobs plus noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], axis=-1)
    for _ in range(12):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(10, 40)
        arr[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    arr += rng.normal(0, 8, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_the_two_groups_cover_every_edit_once() -> None:
    assert set(TRAINED_EDITS) | set(HELD_OUT_EDITS) == set(EDITS)
    assert not set(TRAINED_EDITS) & set(HELD_OUT_EDITS)
    for name in (
        "crop",
        "rescale",
        "brightness_contrast",
        "saturation",
        "mirror",
        "greyscale",
        "jpeg",
        "mix",
    ):
        assert name in TRAINED_EDITS
    for name in ("rotate", "blur", "heavy_crop", "aspect", "overlay", "border", "webp", "png8"):
        assert name in HELD_OUT_EDITS


def test_ranges_are_printable_data() -> None:
    table = edits_table()
    json.dumps(table)  # JSON-ready
    assert table["mix"]["ranges"]["quality"] == [25, 60]
    assert table["mix"]["ranges"]["p_greyscale"] == 0.2
    assert table["rotate"]["held_out"] is True
    assert describe_edits(("mirror",)).startswith("mirror: ")
    assert len(describe_edits().splitlines()) == len(EDITS)


@pytest.mark.parametrize("name", list(EDITS))
def test_same_seed_same_bytes_and_the_copy_decodes(name: str) -> None:
    data = png_bytes(photo())
    first = edit_bytes(data, name, copy_rng(7, 3))
    assert edit_bytes(data, name, copy_rng(7, 3)) == first
    arr = decode_image(first, 32, 3)
    assert arr.shape == (3, 32, 32) and arr.dtype == np.uint8
    # apply_edit on a PIL image gives the same pixels as decoding edit_bytes
    via_pil = np.asarray(apply_edit(photo(), name, copy_rng(7, 3)).convert("RGB"))
    via_bytes = np.asarray(Image.open(io.BytesIO(first)).convert("RGB"))
    np.testing.assert_array_equal(via_pil, via_bytes)


def test_different_seeds_give_different_copies() -> None:
    data = png_bytes(photo())
    assert edit_bytes(data, "mix", copy_rng(0, 0)) != edit_bytes(data, "mix", copy_rng(0, 1))


def test_mirror_and_greyscale_do_exactly_that() -> None:
    img = photo()
    mirrored = np.asarray(apply_edit(img, "mirror", copy_rng(0, 0)))
    np.testing.assert_array_equal(mirrored, np.asarray(img)[:, ::-1])
    grey = apply_edit(img, "greyscale", copy_rng(0, 0))
    assert grey.mode == "L" and grey.size == img.size


def test_crops_keep_the_stated_share_of_each_side() -> None:
    img = photo(400, 300)
    for i in range(20):
        w, h = apply_edit(img, "crop", copy_rng(1, i)).size
        assert 0.75 * 400 - 1 <= w <= 0.95 * 400 + 1 and 0.75 * 300 - 1 <= h <= 0.95 * 300 + 1
        w, h = apply_edit(img, "heavy_crop", copy_rng(1, i)).size
        assert 0.5 * 400 - 1 <= w <= 0.7 * 400 + 1 and 0.5 * 300 - 1 <= h <= 0.7 * 300 + 1


def test_rescale_and_mix_set_the_longer_side_to_200_400() -> None:
    img = photo(512, 384)
    for i in range(20):
        for name in ("rescale", "mix"):
            out = apply_edit(img, name, copy_rng(2, i))
            assert 200 <= max(out.size) <= 400


def test_mix_mirrors_and_greys_about_as_often_as_stated() -> None:
    data = png_bytes(photo(96, 64))
    greys = sum(
        Image.open(io.BytesIO(edit_bytes(data, "mix", copy_rng(3, i)))).mode == "L" for i in range(300)
    )
    assert 30 <= greys <= 95  # 20 % of 300 = 60


def test_codec_edits_use_their_codec() -> None:
    data = png_bytes(photo())
    assert Image.open(io.BytesIO(edit_bytes(data, "jpeg", copy_rng(0, 0)))).format == "JPEG"
    assert Image.open(io.BytesIO(edit_bytes(data, "mix", copy_rng(0, 0)))).format == "JPEG"
    assert Image.open(io.BytesIO(edit_bytes(data, "webp", copy_rng(0, 0)))).format == "WEBP"
    png8 = Image.open(io.BytesIO(edit_bytes(data, "png8", copy_rng(0, 0))))
    assert png8.format == "PNG" and png8.mode == "P"


def test_colour_edits_change_pixels_but_not_geometry() -> None:
    img = photo()
    for name in ("brightness_contrast", "saturation", "blur", "overlay", "jpeg"):
        out = apply_edit(img, name, copy_rng(4, 0)).convert("RGB")
        assert out.size == img.size
        assert np.abs(np.asarray(out, dtype=np.int16) - np.asarray(img, dtype=np.int16)).mean() > 0.5, name


def test_geometric_held_out_edits() -> None:
    img = photo(400, 300)
    rotated = apply_edit(img, "rotate", copy_rng(5, 0))
    assert rotated.size[0] < 400 and abs(rotated.size[0] / rotated.size[1] - 4 / 3) < 0.02
    w, h = apply_edit(img, "aspect", copy_rng(5, 0)).size
    assert (w < 400) != (h < 300)  # exactly one side changed
    bordered = apply_edit(img, "border", copy_rng(5, 0))
    pad = (bordered.size[0] - 400) // 2
    assert pad >= 0.04 * 300 - 1 and bordered.size[1] == 300 + 2 * pad


def test_unknown_edit_names_the_choices() -> None:
    with pytest.raises(ValueError, match="choose from crop"):
        apply_edit(photo(), "sepia", copy_rng(0, 0))
