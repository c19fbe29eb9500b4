"""Geometric verification of candidate duplicate pairs: local features that must agree on one transform,
or, for smooth images, the whole image that must fit one crop.

The embedding puts an edited copy near its original, but in a collection of similar photos (tiles of
one landscape, frames of one scene) it puts the neighbours just as near. What tells them apart is
geometry: a copy shows the same points of the same scene, moved by one crop, scale, small rotation or
mirror; a neighbour shows other points. So each candidate pair is checked like this:

1. Both images are read, turned grey (copies may be greyscale or recoloured), scaled to a longer side
   of `SIDE` px and given local contrast (CLAHE), so that faint textures still give keypoints.
2. ORB keypoints and binary descriptors (OpenCV) on each; the second image also mirrored.
3. Descriptor matches that pass Lowe's ratio test (`RATIO`), then RANSAC fits a similarity transform
   (rotation, uniform scale, shift); the transform must be plausible (scale between 1/4 and 4).
4. The pair is **verified** when at least `MIN_INLIERS` matches agree with it (the better of the
   image and its mirror), or, failing that, when the dense check of `imgsim.duplicates.alignment` finds one image
   a crop of the other (smooth photos give too few keypoints, or only JPEG blocks', but their shapes
   still line up); **rejected** when neither holds and both images have texture enough
   (`TEXTURED_KEYPOINTS`) that a true copy would have matched; **unverifiable** otherwise, and when an
   image is smaller than `MIN_SIDE` or cannot be read: for those the embedding's threshold alone
   decides (`imgsim.duplicates.groups`).

Measured on `bench/duplicates.py --part photos` (docs/results.md): see there for what each setting won.
"""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from imgsim.duplicates import alignment

#: Longer side the images are scaled to before keypoints are found.
SIDE = 256
#: Images with a shorter side below this are not verified (too few keypoints fit).
MIN_SIDE = 64
#: Fewer keypoints than this in either image: no keypoint matching (only the dense check).
MIN_KEYPOINTS = 20
#: Keypoints (ORB, FAST threshold 10, before the contrast boost) an image needs for a failed match to
#: count against a pair: fewer, and it proves nothing (the pair is unverifiable).
TEXTURED_KEYPOINTS = 20
#: Matches that must agree on one transform for a verified pair.
MIN_INLIERS = 20
#: Lowe's ratio test: best match's distance below this share of the second best's.
RATIO = 0.9
#: RANSAC's reprojection tolerance, in pixels at `SIDE`.
RANSAC_PX = 4.0
FEATURES = 1000
#: Pairs verified per chunk, and images whose features stay cached between chunks.
CHUNK_PAIRS = 256
CACHED_IMAGES = 4096
#: A version of the method, stored with the pairs it judged: a change makes them judged again.
VERSION = 2

VERIFIED, REJECTED, UNVERIFIABLE = 1, 0, -1


@dataclass
class Features:
    """Keypoint positions (K, 2) and ORB descriptors (K, 32) of an image and of its mirror image (None
    when it has fewer than `MIN_KEYPOINTS`), and its thumbnail for the dense check."""

    points: np.ndarray | None
    descriptors: np.ndarray | None
    mirror_points: np.ndarray | None
    mirror_descriptors: np.ndarray | None
    #: enough texture before the contrast boost (`TEXTURED_KEYPOINTS`) that a copy would surely match
    textured: bool
    #: `imgsim.duplicates.alignment.thumbnail` of the grey image
    thumbnail: np.ndarray


def settings() -> dict[str, float | int]:
    """What decides a verification (stored with the pairs, so that a change judges them again)."""
    return {
        "version": VERSION,
        "side": SIDE,
        "min_side": MIN_SIDE,
        "min_keypoints": MIN_KEYPOINTS,
        "min_inliers": MIN_INLIERS,
        "textured_keypoints": TEXTURED_KEYPOINTS,
        "ratio": RATIO,
        **alignment.settings(),
    }


def features_of(data: bytes) -> Features | None:
    """The features of an encoded image, or None when it is unverifiable (unreadable or too small)."""
    import cv2

    grey = _grey(data)
    if grey is None:
        return None
    scale = SIDE / max(grey.shape)  # up or down: a copy rescaled to 200 px meets its 512 px original at SIDE
    if scale != 1:
        grey = cv2.resize(
            grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        )
    textured = (
        len(cv2.ORB_create(nfeatures=FEATURES, fastThreshold=10).detect(grey, None)) >= TEXTURED_KEYPOINTS
    )
    pixels = _clahe().apply(grey)
    orb = cv2.ORB_create(nfeatures=FEATURES, fastThreshold=5)
    found: list[np.ndarray | None] = []
    for image in (pixels, np.ascontiguousarray(pixels[:, ::-1])):
        keypoints, descriptors = orb.detectAndCompute(image, None)
        if descriptors is None or len(keypoints) < MIN_KEYPOINTS:
            found = [None] * 4
            break
        found += [np.float32([k.pt for k in keypoints]), descriptors]
    # no keypoints to match: a failed match proves nothing, whatever FAST found before the contrast boost
    textured = textured and found[0] is not None
    return Features(*found, textured=textured, thumbnail=alignment.thumbnail(grey))


def _grey(data: bytes) -> np.ndarray | None:
    """The image as 8-bit grey (EXIF orientation applied), decoded at 1/2, 1/4 or 1/8 of its size where
    that still leaves `SIDE` px (JPEG decodes that much faster); None if unreadable or too small.

    OpenCV decodes (its JPEG decoding kept 3 % more copies verified than Pillow's on the benchmark);
    Pillow takes over for the formats it cannot read."""
    import cv2
    from PIL import Image

    from imgsim.data.decode import apply_orientation

    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            width, height = img.size
    except Exception:  # noqa: BLE001 - any unreadable file is simply unverifiable
        return None
    if min(width, height) < MIN_SIDE:
        return None
    reduce = next(k for k in (8, 4, 2, 1) if max(width, height) // k >= SIDE or k == 1)
    flag = {1: cv2.IMREAD_GRAYSCALE, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
            8: cv2.IMREAD_REDUCED_GRAYSCALE_8}[reduce]  # fmt: skip
    grey = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if grey is not None and grey.dtype == np.uint8 and grey.ndim == 2:
        return grey
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("L", (SIDE, SIDE))
            return np.asarray(apply_orientation(img).convert("L"), np.uint8)
    except Exception:  # noqa: BLE001
        return None


_LOCAL = threading.local()


def _clahe():  # noqa: ANN202 - cv2.CLAHE
    """This thread's CLAHE: one object keeps buffers sized to its last image, so threads may not share it
    (sharing one failed on images of different sizes)."""
    if not hasattr(_LOCAL, "clahe"):
        import cv2

        _LOCAL.clahe = cv2.createCLAHE(clipLimit=3.0, tileGridSize=(4, 4))
    return _LOCAL.clahe


def links(status: np.ndarray, distance: np.ndarray, threshold: float, tolerance: float = 1e-6) -> np.ndarray:
    """Which judged pairs are duplicates: the verified ones, and the unverifiable ones within the
    embedding's `threshold` (a rejected pair never is)."""
    return (status == VERIFIED) | ((status == UNVERIFIABLE) & (distance <= threshold + tolerance))


def judge(a: Features, b: Features) -> tuple[int, int]:
    """(status, inliers) of a pair: VERIFIED with `MIN_INLIERS` or more, or when one image is a crop of the
    other by the dense check (`imgsim.duplicates.alignment.match`); else REJECTED when both images have texture
    enough that a true copy would have matched, UNVERIFIABLE when one is nearly flat (smooth gradients,
    soft blobs: their few keypoints are noise, and fewer matches prove nothing)."""
    found = inliers(a, b)
    if found >= MIN_INLIERS or alignment.match(a.thumbnail, b.thumbnail):
        return VERIFIED, found
    return (REJECTED if a.textured and b.textured else UNVERIFIABLE), found


def inliers(a: Features, b: Features) -> int:
    """Matches of `a` and `b` (or `b`'s mirror image) that agree on one plausible similarity transform
    (0 when either has too few keypoints)."""
    if a.descriptors is None or b.descriptors is None:
        return 0
    return max(
        _inliers(a.points, a.descriptors, b.points, b.descriptors),
        _inliers(a.points, a.descriptors, b.mirror_points, b.mirror_descriptors),
    )


def _inliers(pa: np.ndarray, da: np.ndarray, pb: np.ndarray, db: np.ndarray) -> int:
    import cv2

    matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
    good = [
        m[0] for m in matcher.knnMatch(da, db, k=2) if len(m) == 2 and m[0].distance < RATIO * m[1].distance
    ]
    if len(good) < 4:
        return 0
    src = pa[[m.queryIdx for m in good]]
    dst = pb[[m.trainIdx for m in good]]
    transform, mask = cv2.estimateAffinePartial2D(
        src, dst, method=cv2.RANSAC, ransacReprojThreshold=RANSAC_PX
    )
    if transform is None or mask is None:
        return 0
    scale = float(np.sqrt(abs(np.linalg.det(transform[:, :2]))))
    if not 0.25 <= scale <= 4.0:
        return 0
    return int(mask.sum())


def _features_at(path: str, read: Callable[[str], bytes]) -> Features | None:
    """`features_of` the file at `path`; None (unverifiable) when it cannot be read."""
    try:
        return features_of(read(path))
    except OSError:
        return None


def _pool(threads: int | None) -> ThreadPoolExecutor:
    """Threads for computing features (OpenCV releases the GIL): `threads`, else one per core up to 8."""
    return ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1))


def verify_pairs(
    paths: Sequence[str],
    a: np.ndarray,
    b: np.ndarray,
    read: Callable[[str], bytes],
    *,
    threads: int | None = None,
    on_chunk: Callable[[int], object] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(status, inliers) per pair of row numbers (`a[i]`, `b[i]`) into `paths`: status VERIFIED,
    REJECTED or UNVERIFIABLE (see the module docstring). `read(path)` gives an image's bytes.

    Pairs are taken in chunks of `CHUNK_PAIRS`; the features of a chunk's images are computed, and its
    pairs judged, on `threads` threads (OpenCV releases the GIL); the last `CACHED_IMAGES` images'
    features are kept (~90 KB each), so memory stays bounded however many pairs there are.
    `on_chunk(n)` is called as each chunk of n pairs is judged (a progress bar's update)."""
    status = np.full(len(a), UNVERIFIABLE, np.int8)
    counts = np.zeros(len(a), np.int32)
    cache: OrderedDict[int, Features | None] = OrderedDict()
    order = np.lexsort((b, a))  # pairs of one image together: its features stay cached
    with _pool(threads) as pool:
        for start in range(0, len(order), CHUNK_PAIRS):
            chunk = order[start : start + CHUNK_PAIRS]
            rows = list(dict.fromkeys(np.concatenate([a[chunk], b[chunk]]).tolist()))
            needed = [r for r in rows if r not in cache]
            cache.update(zip(needed, pool.map(lambda r: _features_at(paths[r], read), needed), strict=True))
            pairs = [(i, cache[int(a[i])], cache[int(b[i])]) for i in chunk.tolist()]
            pairs = [(i, fx, fy) for i, fx, fy in pairs if fx is not None and fy is not None]
            for (i, _, _), verdict in zip(pairs, pool.map(lambda p: judge(p[1], p[2]), pairs), strict=True):
                status[i], counts[i] = verdict
            if on_chunk is not None:
                on_chunk(len(chunk))
            for row in rows:
                cache.move_to_end(row)
            while len(cache) > CACHED_IMAGES:
                cache.popitem(last=False)
    return status, counts


def verify_against(
    query: bytes, paths: Sequence[str], read: Callable[[str], bytes], *, threads: int | None = None
) -> np.ndarray:
    """The status (VERIFIED, REJECTED, UNVERIFIABLE) of one image's bytes against each of `paths`."""
    status = np.full(len(paths), UNVERIFIABLE, np.int8)
    mine = features_of(query)
    if mine is None or not len(paths):
        return status

    def verdict(path: str) -> int:
        theirs = _features_at(path, read)
        return UNVERIFIABLE if theirs is None else judge(mine, theirs)[0]

    with _pool(threads) as pool:
        status[:] = list(pool.map(verdict, paths))
    return status
