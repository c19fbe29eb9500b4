"""The Serve app over real HTTP: a running Serve instance on a free loopback port, real requests.

Two applications share one Serve instance (and the session's Ray runtime):
  "/"        allow_private_urls on (to reach the loopback image server), a small body limit, a
             short body time-out, absolute paths (to compare with the in-process Searcher's);
  "/strict"  the defaults for URLs (no private addresses) and paths (relative), and an API key.
"""

from __future__ import annotations

import http.server
import io
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from conftest import free_port, make_pattern_image, wait_healthy
from PIL import Image

ENDPOINTS = ["/search", "/duplicates"]  # the same inputs, the same 4xx rules
MAX_BODY = 200_000  # the "/" app's body limit, small so the 413 tests stay cheap
API_KEY = "test-key-0123456789"
BODY_TIMEOUT_S = 5.0  # the "/" app's wait for a request body, short so the 408 test stays cheap


@dataclass
class Served:
    base: str  # http://127.0.0.1:PORT
    run: Path
    searcher: Any  # an in-process imgsim.index.search.Searcher on the same run
    images: list[Path]  # indexed image files, by id
    image_server: str  # http://127.0.0.1:PORT of a loopback static file server


def build_small_run(root: Path) -> Path:
    """A run directory without training: an untrained (seeded) model indexing 4 x 6 pattern PNGs.

    Written with the library's own pieces (model.save, KMeansClusterer, KnnIndex) in the layout
    `pipelines.build_index` produces, so it needs no Ray and takes a second or two.
    """
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from imgsim.data.decode import decode_image
    from imgsim.index.knn import KMeansClusterer, KnnIndex
    from imgsim.io.atomic import writing_dir
    from imgsim.io.runs import RunPaths
    from imgsim.models import autoencoder as model_lib

    paths = RunPaths(root / "run")
    files, labels = [], []
    for kind, name in enumerate(["stripes-v", "stripes-h", "blob", "checks"]):
        (root / "images" / name).mkdir(parents=True)
        for i in range(6):
            file = root / "images" / name / f"{i:02d}.png"
            make_pattern_image(kind, seed=kind * 100 + i).save(file)
            files.append(str(file))
            labels.append(name)
    torch.manual_seed(0)
    model = model_lib.AutoEncoder(
        model_lib.ModelConfig(image_size=32, channels=1, dim=16, widths=(8, 16, 32))
    )
    model_lib.save(model, paths.root)
    fingerprint = model_lib.fingerprint(paths.root)
    emb = model.embed(np.stack([decode_image(Path(f).read_bytes(), 32, 1) for f in files]))
    clusterer = KMeansClusterer(4).fit(emb)
    index = KnnIndex(metric="cosine", kind="exact").fit(emb)
    table = pa.table(
        {
            "path": pa.array(files, pa.string()),
            "label": pa.array(labels, pa.string()),
            "cluster": pa.array(clusterer.labels_, pa.int64()),
            "embedding": pa.array([list(e) for e in emb], pa.list_(pa.float32())),
        }
    )
    manifest = {"images": len(files), "model_fingerprint": fingerprint, "dim": int(emb.shape[1])}
    with writing_dir(paths.index_dir) as folder:
        index.save(folder, model_fingerprint=fingerprint)
        pq.write_table(table, folder / "embeddings.parquet")
        (folder / "skipped.jsonl").write_text("")
        clusterer.save(folder / "kmeans")
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return paths.root


@pytest.fixture(scope="module")
def serve_tiny_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's `tiny_run` (trained + indexed) when conftest provides it, else a small run."""
    try:
        _data, run = request.getfixturevalue("tiny_run")
    except pytest.FixtureLookupError:
        return build_small_run(tmp_path_factory.mktemp("serve-run"))
    copy = tmp_path_factory.mktemp("serve-run") / "run"  # /duplicates stores its calibration in the run
    shutil.copytree(run, copy)
    return copy


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def image_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A loopback HTTP server for URL queries, serving a fresh folder."""
    root = tmp_path_factory.mktemp("www")
    handler = lambda *a, **kw: _QuietHandler(*a, directory=str(root), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def served(serve_tiny_run: Path, image_server: tuple[str, Path], ray_session: None) -> Iterator[Served]:
    """The real Serve app on a free port (two applications), torn down at the end of the module."""
    from ray import serve

    from imgsim.index.search import Searcher
    from serve.app import build_app

    run = serve_tiny_run
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(
            build_app(
                run,
                allow_private_urls=True,
                max_body_bytes=MAX_BODY,
                num_cpus=0.25,
                paths="absolute",
                body_timeout_s=BODY_TIMEOUT_S,
            ),
            name="imgsim-test",
            route_prefix="/",
        )
        serve.run(
            build_app(run, api_key=API_KEY, num_cpus=0.25),
            name="imgsim-strict",
            route_prefix="/strict",
        )
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base + "/healthz")
        wait_healthy(base + "/strict/healthz")
        searcher = Searcher.load(run, device="cpu", allow_private_urls=True)
        images = [Path(searcher.record(i)["path"]) for i in range(len(searcher))]
        www, root = image_server
        # Files for URL queries: a real image, a text file and an oversize one.
        Image.open(images[0]).save(root / "query.png")
        (root / "notes.txt").write_text("not an image")
        (root / "big.png").write_bytes(_noise_png(600))
        yield Served(base=base, run=run, searcher=searcher, images=images, image_server=www)
    finally:
        serve.shutdown()


def _noise_png(side: int) -> bytes:
    """A PNG of random noise (incompressible: about side*side*3 bytes)."""
    rng = np.random.default_rng(side)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png() -> bytes:
    """A tiny PNG that claims 100 M pixels (over Pillow's decompression-bomb limit)."""
    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _assert_error(response: requests.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    return body


def _assert_alive(served: Served) -> None:
    r = requests.get(served.base + "/healthz", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"


def _assert_same_results(answer: dict[str, Any], expected: dict[str, Any], k: int) -> None:
    """Same records as the in-process search; ids may only differ where distances tie."""
    got, want = answer["results"], expected["results"]
    assert [r["rank"] for r in got] == list(range(1, k + 1))
    np.testing.assert_allclose(
        [r["distance"] for r in got], [r["distance"] for r in want], rtol=1e-4, atol=1e-5
    )
    for g, w in zip(got, want, strict=True):
        if g["id"] != w["id"]:  # a tie broken the other way: its distance equals a neighbour's
            assert any(abs(o["distance"] - g["distance"]) < 1e-5 for o in want if o["id"] == g["id"]), (g, w)
            continue
        assert (g["path"], g["label"], g["cluster"]) == (w["path"], w["label"], w["cluster"])
    assert answer["cluster"] == expected["cluster"]
    assert isinstance(answer["took_ms"], (int, float)) and answer["took_ms"] >= 0


# --- the happy paths ------------------------------------------------------------------------------


def test_healthz_reports_the_index(served: Served) -> None:
    r = requests.get(served.base + "/healthz", timeout=10)
    assert r.status_code == 200
    health = r.json()
    assert {k: health[k] for k in ("status", "images")} == {"status": "ok", "images": len(served.searcher)}
    assert isinstance(health["replica"], str) and health["replica"]  # which replica answered


def test_multipart_upload_matches_in_process_search(served: Served) -> None:
    path = served.images[3]
    r = requests.post(
        served.base + "/search",
        params={"k": 5},
        files={"image": (path.name, path.read_bytes(), "image/png")},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    _assert_same_results(r.json(), served.searcher.search(path, k=5), k=5)
    nearest = [x["id"] for x in r.json()["results"] if x["distance"] < 1e-4]
    assert 3 in nearest  # an indexed image finds itself at distance 0


def test_raw_body_upload_matches_in_process_search(served: Served) -> None:
    path = served.images[7]
    r = requests.post(
        served.base + "/search?k=4",
        data=path.read_bytes(),
        headers={"Content-Type": "image/png"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    _assert_same_results(r.json(), served.searcher.search(path, k=4), k=4)


def test_default_k_and_k_as_a_form_field(served: Served) -> None:
    path = served.images[0]
    r = requests.post(served.base + "/search", data=path.read_bytes(), headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == min(10, len(served.searcher))
    r = requests.post(served.base + "/search", files={"image": path.open("rb")}, data={"k": "2"}, timeout=30)
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == 2


def test_url_query_against_a_loopback_image_server(served: Served) -> None:
    url = served.image_server + "/query.png"
    r = requests.post(served.base + "/search", json={"url": url, "k": 3}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["query"] == url
    _assert_same_results(r.json(), served.searcher.search(served.images[0], k=3), k=3)


def test_concurrent_queries_are_batched_and_each_gets_its_own_answer(served: Served) -> None:
    ids = list(range(min(12, len(served.images))))

    def one(i: int) -> dict[str, Any]:
        r = requests.post(
            served.base + f"/search?k={1 + i % 4}",
            data=served.images[i].read_bytes(),
            headers={"Content-Type": "image/png"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(len(ids)) as pool:
        answers = list(pool.map(one, ids))
    for i, answer in zip(ids, answers, strict=True):
        _assert_same_results(answer, served.searcher.search(served.images[i], k=1 + i % 4), k=1 + i % 4)


def test_images_by_id_are_the_indexed_files(served: Served) -> None:
    for image_id in (0, len(served.images) - 1):
        r = requests.get(served.base + f"/images/{image_id}", timeout=10)
        assert r.status_code == 200
        assert r.headers["content-type"] == "image/png"
        assert r.content == served.images[image_id].read_bytes()


def test_an_indexed_image_is_a_duplicate_of_itself(served: Served) -> None:
    path = served.images[3]
    r = requests.post(
        served.base + "/duplicates", files={"image": (path.name, path.read_bytes(), "image/png")}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["duplicate"] is True and body["threshold"] >= 0
    assert body["matches"][0] == {
        "id": 3,
        "path": str(path),
        "distance": body["matches"][0]["distance"],
        "exact": True,
    }
    assert all(m["distance"] <= body["threshold"] + 1e-5 for m in body["matches"][1:])
    # the replica calibrated on its first request and stored it; in-process reads the stored one
    from imgsim.duplicates.lookup import DuplicateLookup

    in_process = DuplicateLookup(served.searcher).duplicates_of(path)
    assert (body["threshold_source"], in_process["threshold_source"]) in {
        ("calibrated", "stored calibration"),
        ("stored calibration", "stored calibration"),
    }
    assert (body["threshold"], body["matches"]) == (in_process["threshold"], in_process["matches"])
    # the raw body, a URL and the API key all work as for /search
    raw = requests.post(
        served.base + "/duplicates", data=path.read_bytes(), headers={"Content-Type": "image/png"}
    )
    assert raw.json()["matches"] == body["matches"]
    url = requests.post(served.base + "/duplicates", json={"url": served.image_server + "/query.png"})
    assert url.status_code == 200 and url.json()["matches"][0]["id"] == 0
    keyed = requests.post(
        served.base + "/strict/duplicates?k=1",
        data=path.read_bytes(),
        headers={"Content-Type": "image/png", **_bearer(API_KEY)},
    )
    assert keyed.status_code == 200 and len(keyed.json()["matches"]) == 1


def test_an_unrelated_image_is_not_a_duplicate(served: Served) -> None:
    r = requests.post(served.base + "/duplicates", data=_noise_png(48), headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    assert r.json()["duplicate"] is False and r.json()["matches"] == []


def test_the_web_page_and_its_assets(served: Served) -> None:
    r = requests.get(served.base + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "imgsim" in r.text and 'type="file"' in r.text
    for asset in ("/static/app.js", "/static/app.css"):
        assert requests.get(served.base + asset, timeout=10).status_code == 200


# --- hostile and broken input: JSON 4xx, and the service stays up ----------------------------------


@pytest.mark.parametrize("image_id", ["999999", "-1", "abc", "1e3", "0x1", "%2e%2e%2fetc%2fpasswd", "²"])
def test_unknown_image_ids_are_404(served: Served, image_id: str) -> None:
    _assert_error(requests.get(served.base + f"/images/{image_id}", timeout=10), 404)
    _assert_alive(served)


def test_path_traversal_is_not_served(served: Served) -> None:
    for path in ("/images/../../etc/passwd", "/images/..%2f..%2fetc%2fpasswd", "/static/../app.py"):
        r = requests.get(served.base + path, timeout=10)
        assert r.status_code == 404, (path, r.status_code)
        assert "root:" not in r.text and "import" not in r.text
    _assert_alive(served)


@pytest.mark.parametrize("k", ["0", "-1", "101", "abc", "1.5", "", "1e2", "99999999999999"])
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_bad_k_in_the_query_string_is_400(served: Served, endpoint: str, k: str) -> None:
    r = requests.post(
        served.base + f"{endpoint}?k={k}",
        data=served.images[0].read_bytes(),
        headers={"Content-Type": "image/png"},
        timeout=10,
    )
    assert "k" in _assert_error(r, 400)["error"]
    _assert_alive(served)


@pytest.mark.parametrize("k", [0, 101, 2.5, True, "x", {"n": 3}, [3]])
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_bad_k_in_json_is_400(served: Served, endpoint: str, k: object) -> None:
    body = {"url": served.image_server + "/query.png", "k": k}
    r = requests.post(served.base + endpoint, json=body, timeout=10)
    _assert_error(r, 400)
    _assert_alive(served)


@pytest.mark.parametrize(
    "kind",
    ["text-as-png", "truncated-png", "empty", "multipart-text", "multipart-no-image-field", "html"],
)
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_not_an_image_is_400(served: Served, endpoint: str, kind: str) -> None:
    png = served.images[0].read_bytes()
    url = served.base + endpoint
    if kind == "text-as-png":
        r = requests.post(url, data=b"hello, not an image", headers={"Content-Type": "image/png"})
    elif kind == "truncated-png":
        r = requests.post(url, data=png[: len(png) // 2], headers={"Content-Type": "image/png"})
    elif kind == "empty":
        r = requests.post(url, data=b"", headers={"Content-Type": "image/png"})
    elif kind == "multipart-text":
        r = requests.post(url, files={"image": ("notes.txt", b"just text", "text/plain")})
    elif kind == "multipart-no-image-field":
        r = requests.post(url, files={"picture": ("a.png", png, "image/png")})
    else:
        r = requests.post(
            url, data=b"<html><script>alert(1)</script>", headers={"Content-Type": "image/svg+xml"}
        )
    _assert_error(r, 400)
    _assert_alive(served)


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1, 2]", b'{"k": 3}', b'{"url": 42}', b'{"url": ""}', b"\xff\xfe\x00"],
)
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_malformed_json_queries_are_400(served: Served, endpoint: str, body: bytes) -> None:
    r = requests.post(served.base + endpoint, data=body, headers={"Content-Type": "application/json"})
    _assert_error(r, 400)
    _assert_alive(served)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_malformed_multipart_is_400(served: Served, endpoint: str) -> None:
    r = requests.post(
        served.base + endpoint,
        data=b"--xyz\r\nContent-Disposition: form-data; name=image\r\n\r\nabc",  # never closed
        headers={"Content-Type": "multipart/form-data; boundary=xyz"},
    )
    assert r.status_code == 400, r.text
    _assert_alive(served)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_decompression_bomb_is_refused_with_a_reason(served: Served, endpoint: str) -> None:
    bomb = _bomb_png()
    assert len(bomb) < MAX_BODY  # small on the wire: only decoding would be huge
    r = requests.post(served.base + endpoint, data=bomb, headers={"Content-Type": "image/png"}, timeout=30)
    assert r.status_code in (400, 413)
    assert "decompression bomb" in _assert_error(r, r.status_code)["error"]
    _assert_alive(served)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_oversize_body_is_413_by_content_length(served: Served, endpoint: str) -> None:
    big = _noise_png(400)
    assert len(big) > MAX_BODY
    r = requests.post(served.base + endpoint, data=big, headers={"Content-Type": "image/png"}, timeout=30)
    assert str(MAX_BODY) in _assert_error(r, 413)["error"]
    r = requests.post(served.base + endpoint, files={"image": ("big.png", big, "image/png")}, timeout=30)
    _assert_error(r, 413)
    _assert_alive(served)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_oversize_body_is_413_while_streaming_without_content_length(served: Served, endpoint: str) -> None:
    def chunks() -> Iterator[bytes]:  # chunked transfer encoding: no Content-Length to check
        for _ in range(2 * MAX_BODY // 16_384 + 2):
            yield b"\x89PNG" + bytes(16_380)

    r = requests.post(
        served.base + endpoint, data=chunks(), headers={"Content-Type": "image/png"}, timeout=30
    )
    _assert_error(r, 413)
    _assert_alive(served)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_oversize_url_image_is_refused(served: Served, endpoint: str) -> None:
    r = requests.post(served.base + endpoint, json={"url": served.image_server + "/big.png"}, timeout=30)
    assert r.status_code in (400, 413), r.text
    _assert_error(r, r.status_code)
    _assert_alive(served)


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml", None]
)
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_unsupported_content_type_is_415(served: Served, endpoint: str, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    r = requests.post(served.base + endpoint, data=b"whatever", headers=headers, timeout=10)
    if content_type is None:  # requests sends no Content-Type for raw bytes
        assert "content-type" not in {h.lower() for h in r.request.headers}
    _assert_error(r, 415)
    _assert_alive(served)


@pytest.mark.parametrize(
    "url",
    ["/notes.txt", "/missing.png", "file:///etc/passwd", "ftp://127.0.0.1/x.png", "http://", "not a url"],
)
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_bad_urls_are_4xx_or_502(served: Served, endpoint: str, url: str) -> None:
    if url.startswith("/"):
        url = served.image_server + url
    r = requests.post(served.base + endpoint, json={"url": url}, timeout=30)
    assert 400 <= r.status_code < 500 or r.status_code in (502, 504), r.text
    _assert_error(r, r.status_code)
    _assert_alive(served)


def test_unknown_routes_and_methods_are_json(served: Served) -> None:
    _assert_error(requests.get(served.base + "/nope", timeout=10), 404)
    _assert_error(requests.get(served.base + "/search", timeout=10), 405)
    _assert_error(requests.delete(served.base + "/images/0", timeout=10), 405)
    _assert_alive(served)


# --- hostile input (issue 30): each answer a JSON 4xx, the replica alive after it ------------------


def test_head_on_the_page_and_healthz_is_200(served: Served) -> None:
    """Health probes use HEAD; /healthz needs no key even where the app has one."""
    for url in (served.base + "/", served.base + "/healthz", served.base + "/strict/healthz"):
        r = requests.head(url, timeout=10)
        assert r.status_code == 200 and r.content == b"", (url, r.status_code)


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/strict/docs", "/strict/openapi.json"])
def test_api_docs_are_off(served: Served, path: str) -> None:
    """No generated docs (whose page loads a script from a CDN) and no schema without a key."""
    _assert_error(requests.get(served.base + path, timeout=10), 404)


@pytest.mark.parametrize("depth", [1000, 7000])  # 2 KB (was a 500: RecursionError) and 14 KB
@pytest.mark.parametrize("field", ["url", "k", "other"])
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_deeply_nested_json_is_400(served: Served, endpoint: str, field: str, depth: int) -> None:
    body = f'{{"{field}": {"[" * depth + "]" * depth}}}'
    r = requests.post(
        served.base + endpoint, data=body, headers={"Content-Type": "application/json"}, timeout=30
    )
    error = _assert_error(r, 400)["error"]
    if depth > 1000:  # past any recursion limit, whatever the replica's stack holds already
        assert "nested too deeply" in error
    _assert_alive(served)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_oversize_json_is_413(served: Served, endpoint: str) -> None:
    """A JSON query holds a URL and k: far less than an upload may be (ServeConfig.max_json_bytes)."""
    from imgsim.config import DEFAULTS

    url = "http://127.0.0.1/" + "a" * DEFAULTS.serve.max_json_bytes
    r = requests.post(served.base + endpoint, json={"url": url}, timeout=30)
    assert str(DEFAULTS.serve.max_json_bytes) in _assert_error(r, 413)["error"]
    _assert_alive(served)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_too_many_pixels_is_413(served: Served, endpoint: str) -> None:
    """9000 x 9000 (81 M pixels) is under Pillow's bomb guard but over the HTTP queries' pixel cap;
    a small PNG (about 10 KB) that would decode to hundreds of MB."""
    from imgsim.config import DEFAULTS

    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, format="PNG", optimize=True)
    assert DEFAULTS.serve.max_query_pixels < 9000 * 9000
    r = requests.post(
        served.base + endpoint, data=buf.getvalue(), headers={"Content-Type": "image/png"}, timeout=60
    )
    _assert_error(r, 413)
    _assert_alive(served)


def test_a_stalled_body_is_408(served: Served) -> None:
    """A client that announces a body and never sends it is answered, not held open forever."""
    host, port = served.base.removeprefix("http://").split(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=60) as conn:
        conn.sendall(
            b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 10000\r\n\r\n"
            + b"\x89PNG" * 4
        )
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    took = time.monotonic() - started
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"application/json" in head.lower() and b"did not arrive" in body, answer[:600]
    assert BODY_TIMEOUT_S <= took < BODY_TIMEOUT_S + 20
    _assert_alive(served)


# --- the strict application: SSRF guard on, API key required ---------------------------------------


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_private_urls_are_refused_by_default(served: Served) -> None:
    url = served.image_server + "/query.png"
    for target in (url, url.replace("127.0.0.1", "localhost"), "http://169.254.169.254/latest/meta-data"):
        r = requests.post(served.base + "/strict/search", json={"url": target}, headers=_bearer(API_KEY))
        assert 400 <= r.status_code < 500, (target, r.status_code, r.text)
        _assert_error(r, r.status_code)
    _assert_alive(served)


@pytest.mark.parametrize("headers", [{}, _bearer("wrong-key"), {"Authorization": API_KEY}, _bearer("")])
def test_api_key_is_required_when_set(served: Served, headers: dict[str, str]) -> None:
    png = served.images[0].read_bytes()
    search = requests.post(
        served.base + "/strict/search", data=png, headers={"Content-Type": "image/png", **headers}
    )
    assert _assert_error(search, 401) and search.headers["www-authenticate"].startswith("Bearer")
    dup = requests.post(
        served.base + "/strict/duplicates", data=png, headers={"Content-Type": "image/png", **headers}
    )
    _assert_error(dup, 401)
    _assert_error(requests.get(served.base + "/strict/images/0", headers=headers, timeout=10), 401)
    # Health and the page stay open.
    assert requests.get(served.base + "/strict/healthz", timeout=10).status_code == 200
    assert requests.get(served.base + "/strict/", timeout=10).status_code == 200


def test_api_key_lets_requests_through(served: Served) -> None:
    path = served.images[2]
    r = requests.post(
        served.base + "/strict/search?k=3",
        data=path.read_bytes(),
        headers={"Content-Type": "image/png", **_bearer(API_KEY)},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    expected, answer = served.searcher.search(path, k=3), r.json()
    # the default --paths: relative to the indexed folder, never the server's absolute path
    for got, want in zip(answer["results"], expected["results"], strict=True):
        assert not got["path"].startswith("/") and want["path"].endswith("/" + got["path"]), (got, want)
        assert len(Path(got["path"]).parts) == 2  # <label>/<file>: the folder the images share is cut
        got["path"] = want["path"]
    _assert_same_results(answer, expected, k=3)
    r = requests.get(served.base + "/strict/images/2", headers=_bearer(API_KEY), timeout=10)
    assert r.status_code == 200 and r.content == path.read_bytes()


# --- configuration --------------------------------------------------------------------------------


def test_config_yaml_is_a_valid_serve_config(tmp_path: Path) -> None:
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((Path(__file__).parents[1] / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "serve.app:app_builder"
    assert app.deployments[0].name == "ImgsimSearch"


def test_app_builder_needs_a_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from imgsim.errors import RunNotFound
    from serve.app import app_builder

    monkeypatch.delenv("IMGSIM_RUN", raising=False)
    with pytest.raises(RunNotFound, match="IMGSIM_RUN"):
        app_builder({"run": ""})
    with pytest.raises(RunNotFound, match="no model"):
        app_builder({"run": str(tmp_path)})


def test_app_builder_takes_the_run_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, serve_tiny_run: Path
) -> None:
    from ray.serve import Application

    from serve.app import app_builder

    monkeypatch.setenv("IMGSIM_RUN", str(serve_tiny_run))
    assert isinstance(app_builder({"run": "", "max_k": 50}), Application)


def test_json_body_is_a_dump_of_the_answer(served: Served) -> None:
    """The answer is plain JSON a shell script can consume (no NaN, numbers as numbers)."""
    r = requests.post(
        served.base + "/search?k=2",
        data=served.images[1].read_bytes(),
        headers={"Content-Type": "image/png"},
        timeout=30,
    )
    parsed = json.loads(r.text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert all(isinstance(x["distance"], float) for x in parsed["results"])
