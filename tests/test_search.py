"""Searcher: every query form gives the same answer; distances, clusters and errors make sense."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgsim import Searcher
from imgsim.cli import main
from imgsim.errors import BadQuery, ModelMismatch


@pytest.fixture(scope="module")
def searcher(tiny_run: tuple[Path, Path]) -> Searcher:
    return Searcher.load(tiny_run[1])


@pytest.fixture
def image_server(tiny_run: tuple[Path, Path]) -> Iterator[str]:
    data = tiny_run[0]

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):  # type: ignore[no-untyped-def]
            super().__init__(*a, directory=str(data), **kw)

        def log_message(self, *a) -> None:  # type: ignore[no-untyped-def]
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_indexed_image_finds_itself_first(searcher: Searcher, tiny_run: tuple[Path, Path]) -> None:
    path = tiny_run[0] / "blob" / "03.png"
    result = searcher.search(str(path), k=5)
    top = result["results"][0]
    assert top["path"] == str(path) and top["distance"] == pytest.approx(0, abs=1e-4) and top["rank"] == 1
    assert [r["rank"] for r in result["results"]] == [1, 2, 3, 4, 5]
    assert all(
        a["distance"] <= b["distance"] for a, b in zip(result["results"], result["results"][1:], strict=False)
    )
    assert result["cluster"] == top["cluster"]
    assert set(top) == {"rank", "id", "path", "label", "cluster", "distance"}


def test_same_class_images_come_first(searcher: Searcher, tiny_run: tuple[Path, Path]) -> None:
    hits = 0
    for name in ["stripes-v", "stripes-h", "blob", "checks"]:
        result = searcher.search(str(tiny_run[0] / name / "00.png"), k=4)
        hits += sum(r["label"] == name for r in result["results"])
    assert hits / 16 >= 0.75


def test_path_bytes_pil_and_array_give_the_same_answer(
    searcher: Searcher, tiny_run: tuple[Path, Path]
) -> None:
    path = tiny_run[0] / "checks" / "05.png"
    by_path = searcher.search(str(path), k=3)["results"]
    by_bytes = searcher.search(path.read_bytes(), k=3)["results"]
    by_pil = searcher.search(Image.open(path), k=3)["results"]
    by_array = searcher.search(np.asarray(Image.open(path)), k=3)["results"]
    assert by_path == by_bytes == by_pil == by_array


def test_url_queries_and_ssrf_refusal(
    searcher: Searcher, image_server: str, tiny_run: tuple[Path, Path]
) -> None:
    url = f"{image_server}/blob/01.png"
    assert searcher.search(url, k=1)["results"][0]["path"] == str(tiny_run[0] / "blob" / "01.png")
    guarded = Searcher.load(tiny_run[1], allow_private_urls=False)
    with pytest.raises(BadQuery, match="not a public address"):
        guarded.search(url, k=1)


def test_within_cluster_results_stay_in_the_query_cluster(
    searcher: Searcher, tiny_run: tuple[Path, Path]
) -> None:
    result = searcher.search(str(tiny_run[0] / "blob" / "00.png"), k=8, within_cluster=True)
    assert all(r["cluster"] == result["cluster"] for r in result["results"])


def test_bad_queries_are_clear_errors(searcher: Searcher, tmp_path: Path) -> None:
    (tmp_path / "x.png").write_text("not a picture")
    with pytest.raises(BadQuery, match="not an image"):
        searcher.search(str(tmp_path / "x.png"))
    with pytest.raises(BadQuery, match="no such file"):
        searcher.search(str(tmp_path / "missing.png"))
    with pytest.raises(BadQuery, match="only http and https"):
        searcher.search("ftp://example.com/a.png")


def test_image_bytes_only_for_indexed_ids(searcher: Searcher, tiny_run: tuple[Path, Path]) -> None:
    data, ctype = searcher.image_bytes(0)
    assert data == Path(searcher.paths[0]).read_bytes() and ctype == "image/png"
    with pytest.raises(KeyError):
        searcher.image_bytes(len(searcher))
    with pytest.raises(KeyError):
        searcher.image_bytes(-1)


def test_an_index_from_another_model_is_refused(tiny_run: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    from imgsim.models import autoencoder as model_lib

    run = tmp_path / "run"
    shutil.copytree(tiny_run[1], run)
    m = model_lib.load(run)
    m.emb_mean.add_(1.0)
    model_lib.save(m, run)
    with pytest.raises(ModelMismatch, match="re-run `imgsim index"):
        Searcher.load(run)


def test_query_json_and_plot_through_the_cli(tiny_run: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    import json

    path = tiny_run[0] / "stripes-h" / "02.png"
    assert (
        main(
            [
                "query",
                str(path),
                "--model",
                str(tiny_run[1]),
                "-k",
                "3",
                "--json",
                "--plot",
                str(tmp_path / "q.png"),
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["query"] == str(path) and isinstance(out["cluster"], int) and len(out["results"]) == 3
    assert Image.open(tmp_path / "q.png").size[0] > 400
    assert main(["tsne", "--model", str(tiny_run[1]), "--out", str(tmp_path / "t.png")]) == 0
    assert Image.open(tmp_path / "t.png").size[0] > 400
