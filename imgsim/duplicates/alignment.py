"""A dense check for candidate duplicates that local features cannot judge.

Smooth photos (soft shading, curved edges, bokeh, a wall in side light) give ORB too few keypoints to
verify an edited copy, and JPEG blocks give them keypoints that match nothing. What such a copy still
shares with its original is its large-scale shape: one image, blurred and grey, is the other's crop,
rescaled and perhaps mirrored. So both images are shrunk to `SIDE` px, and the crop (each side's share,
mirror or not, either image inside the other) is searched by normalised cross-correlation, coarse at
`COARSE_SIDE` px and then refined. The pair matches when, at the best crop:

- the grey levels correlate (`MIN_CORRELATION`; brightness, contrast, saturation and greyscale barely
  change a blurred grey image's correlation with its original);
- so do their gradients (`MIN_GRADIENT_CORRELATION`: the edges line up, not only the shading);
- and the alignment is distinct (`MIN_DISTINCTNESS`): moving one image by `SHIFT` of its size loses
  that much gradient correlation. Linear and radial gradients, and flat tiles, correlate with one
  another at many alignments; a copy fits at one.

Measured (docs/results.md, `bench/duplicates.py --part photos`): of the candidate pairs ORB did not verify, it
verifies 11 of the 16 planted copies and none of the 1,259 false pairs. Against edited copies of
held-out photo tiles and of smooth-gradient tiles, each beside its 5 nearest look-alikes: 106 of 150
photo copies and 1 of 750 look-alikes (a tile that does contain the other, cut at another scale);
none of the 150 gradient copies and none of their 750 look-alikes (so gradients stay unverifiable).
"""

from __future__ import annotations

import numpy as np

#: Longer side (px) of the thumbnails compared; the coarse search runs at `COARSE_SIDE`.
SIDE = 96
COARSE_SIDE = 32
#: Share of each side that the smaller image may cover of the larger (a crop of 50-100 %).
SHARES = np.linspace(0.5, 1.0, 11)
#: Crops refined at `SIDE`, and the refinement's steps around each.
REFINED = 3
REFINE_STEPS = np.linspace(-0.04, 0.04, 5)
#: A coarse correlation below this is not refined (it saved a third of the time with the same matches).
MIN_COARSE = 0.9
MIN_CORRELATION = 0.99
MIN_GRADIENT_CORRELATION = 0.97
MIN_DISTINCTNESS = 0.1
SHIFT = 0.08
#: Blur (px at `SIDE`) before comparing: JPEG blocks and noise out, shapes kept.
BLUR = 1.0


def thumbnail(grey: np.ndarray) -> np.ndarray:
    """The grey image (uint8) at a longer side of `SIDE` px, as compared by `match`."""
    import cv2

    scale = SIDE / max(grey.shape)
    size = (max(8, round(grey.shape[1] * scale)), max(8, round(grey.shape[0] * scale)))
    return cv2.resize(grey, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def settings() -> dict[str, float]:
    return {
        "dense_side": SIDE,
        "dense_coarse_side": COARSE_SIDE,
        "dense_correlation": MIN_CORRELATION,
        "dense_gradient_correlation": MIN_GRADIENT_CORRELATION,
        "dense_distinctness": MIN_DISTINCTNESS,
    }


def match(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether thumbnails `a` and `b` (`thumbnail`) show one image, one of them cropped, rescaled (each
    side by its own share), mirrored or recoloured (see the module docstring)."""
    correlation, gradients, distinctness = scores(a, b)
    return (
        correlation >= MIN_CORRELATION
        and gradients >= MIN_GRADIENT_CORRELATION
        and distinctness >= MIN_DISTINCTNESS
    )


def scores(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """(grey correlation, gradient correlation, distinctness) at the crop that best aligns `a` and `b`."""
    fine = {key: _blurred(x) for key, x in (("a", a), ("b", b))}
    coarse = {key: _shrunk(x) for key, x in fine.items()}
    best = (-1.0, 0.0, 0.0)
    for big, small in (("a", "b"), ("b", "a")):
        found = _search(coarse[big], coarse[small], SHARES, SHARES, (False, True))[:REFINED]
        for coarse_correlation, mirrored, sx, sy in found:
            if coarse_correlation < MIN_COARSE:
                break
            refined = _search(fine[big], fine[small], sx + REFINE_STEPS, sy + REFINE_STEPS, (mirrored,))
            if refined and refined[0][0] > best[0]:
                best = _at(fine[big], fine[small], *refined[0][1:])
    return best


def _blurred(x: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(x.astype(np.float32), (0, 0), BLUR)


def _shrunk(x: np.ndarray) -> np.ndarray:
    import cv2

    scale = COARSE_SIDE / max(x.shape)
    return cv2.resize(x, (max(4, round(x.shape[1] * scale)), max(4, round(x.shape[0] * scale))),
                      interpolation=cv2.INTER_AREA)  # fmt: skip


def _template(
    small: np.ndarray, big_shape: tuple[int, ...], mirrored: bool, sx: float, sy: float
) -> np.ndarray | None:
    """`small` (mirrored or not) resized to cover `sx` x `sy` of `big_shape`; None if it would not fit."""
    import cv2

    w, h = round(sx * big_shape[1]), round(sy * big_shape[0])
    if not (4 <= w <= big_shape[1] and 4 <= h <= big_shape[0]):
        return None
    return cv2.resize(small[:, ::-1] if mirrored else small, (w, h), interpolation=cv2.INTER_AREA)


def _search(
    big: np.ndarray, small: np.ndarray, shares_x: np.ndarray, shares_y: np.ndarray, mirrors: tuple[bool, ...]
) -> list[tuple[float, bool, float, float]]:
    """(correlation, mirrored, share x, share y) of each crop of `big` that `small` best fits, best first."""
    import cv2

    found = []
    for mirrored in mirrors:
        for sx in shares_x:
            for sy in shares_y:
                t = _template(small, big.shape, mirrored, float(sx), float(sy))
                if t is not None:
                    found.append(
                        (float(cv2.matchTemplate(big, t, cv2.TM_CCOEFF_NORMED).max()), mirrored, sx, sy)
                    )
    return sorted(found, key=lambda f: -f[0])


def _at(
    big: np.ndarray, small: np.ndarray, mirrored: bool, sx: float, sy: float
) -> tuple[float, float, float]:
    import cv2

    t = _template(small, big.shape, mirrored, sx, sy)
    response = cv2.matchTemplate(big, t, cv2.TM_CCOEFF_NORMED)
    _, correlation, _, (x, y) = cv2.minMaxLoc(response)
    region = big[y : y + t.shape[0], x : x + t.shape[1]]
    gradients = _gradient_correlation(region, t)
    return float(correlation), gradients, gradients - _shifted(region, t)


def _gradients(x: np.ndarray) -> np.ndarray:
    import cv2

    return np.concatenate([cv2.Sobel(x, cv2.CV_32F, 1, 0).ravel(), cv2.Sobel(x, cv2.CV_32F, 0, 1).ravel()])


def _gradient_correlation(a: np.ndarray, b: np.ndarray) -> float:
    ga, gb = _gradients(a), _gradients(b)
    return float(ga @ gb / (np.linalg.norm(ga) * np.linalg.norm(gb) + 1e-9))


def _shifted(region: np.ndarray, t: np.ndarray) -> float:
    """The best gradient correlation of `t` moved by `SHIFT` of its size, each of four ways, over `region`."""
    h, w = t.shape
    dy, dx = max(1, round(SHIFT * h)), max(1, round(SHIFT * w))
    out = []
    for sy, sx in ((dy, 0), (-dy, 0), (0, dx), (0, -dx)):
        a = region[max(sy, 0) : h + min(sy, 0), max(sx, 0) : w + min(sx, 0)]
        b = t[max(-sy, 0) : h + min(-sy, 0), max(-sx, 0) : w + min(-sx, 0)]
        out.append(_gradient_correlation(a, b))
    return max(out)
