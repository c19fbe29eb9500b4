"""The web page in a real headless browser (Debian's chromium driven by Playwright).

Skipped, with the reason, when chromium or Playwright is missing (`make browser` installs chromium).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, wait_healthy
from test_serve import build_small_run

CHROMIUM = os.environ.get("IMGSIM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT = Path(tempfile.gettempdir()) / "imgsim-web.png"  # left for a person to look at
K = 6
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).is_file(), reason=f"no chromium at {CHROMIUM} (install it: `make browser`)"
)


@pytest.fixture(scope="module")
def web_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's `tiny_run` (trained + indexed) when conftest provides it, else a small run."""
    try:
        _data, run = request.getfixturevalue("tiny_run")
    except pytest.FixtureLookupError:
        return build_small_run(tmp_path_factory.mktemp("web-run"))
    copy = tmp_path_factory.mktemp("web-run") / "run"  # /duplicates stores its calibration in the run
    shutil.copytree(run, copy)
    return copy


@pytest.fixture(scope="module")
def base_url(web_run: Path, ray_session: None) -> Iterator[str]:
    """The real Serve app on a free loopback port for this module."""
    from ray import serve

    from serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(web_run, num_cpus=0.25, paths="absolute"), name="imgsim-web", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base + "/healthz")
        yield base
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def page(base_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as p:
        # A fresh profile per run; Playwright wants it as user_data_dir, not as a flag.
        context = p.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1200, "height": 900},
            timeout=60_000,
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(60_000)
            page.goto(base_url + "/")
            yield page
        finally:
            context.close()


def test_before_the_first_query_there_is_no_results_panel(page) -> None:  # noqa: ANN001
    assert page.locator("#empty").is_visible()
    assert page.locator("#results-section").is_hidden()
    assert not page.locator("#query-img").is_visible()  # no broken "your query image" picture
    assert page.locator("#results .result").count() == 0


def test_upload_shows_result_thumbnails(page, web_run: Path) -> None:  # noqa: ANN001
    from imgsim.index.search import Searcher

    searcher = Searcher.load(web_run)
    query = Path(searcher.record(5)["path"])
    page.fill("#k", str(K))
    page.set_input_files("#file", str(query))
    page.wait_for_function(
        """k => {
            const imgs = [...document.querySelectorAll('#results .result img')];
            return imgs.length === k && imgs.every(img => img.complete && img.naturalWidth > 0);
        }""",
        arg=min(K, len(searcher)),
    )
    captions = page.locator("#results .distance").all_inner_texts()
    assert len(captions) == min(K, len(searcher))
    assert all(c.startswith("distance ") for c in captions)
    expected = searcher.search(query, k=K)["results"]
    assert [
        int(i) for i in page.locator("#results .result").evaluate_all("els => els.map(e => e.dataset.id)")
    ] == [r["id"] for r in expected]
    assert page.locator("#results .tag.cluster").count() == len(captions)
    assert page.evaluate("document.querySelector('#query-img').naturalWidth") > 0
    assert page.locator("#error").is_hidden()
    assert "images indexed" in page.inner_text("#status")
    # the query is an indexed file: the page says what it duplicates, and marks that result
    note = page.locator("#duplicate-note")
    note.wait_for(state="visible")
    assert note.inner_text().startswith(f"Duplicate of {query}")
    first = page.locator("#results .result").first
    assert "duplicate" in (first.get_attribute("class") or "")
    assert first.locator(".tag.dup").inner_text() == "identical file"
    page.screenshot(path=str(SCREENSHOT), full_page=True)


def test_clicking_a_result_searches_by_it(page, web_run: Path) -> None:  # noqa: ANN001
    from imgsim.index.search import Searcher

    searcher = Searcher.load(web_run)
    second = page.locator("#results .result").nth(1)
    clicked = int(second.get_attribute("data-id"))
    second.click()
    page.wait_for_function(
        "id => document.querySelector('#summary-meta').textContent.includes(`more like result image ${id}`)",
        arg=clicked,
    )
    page.wait_for_function("() => document.querySelector('#query-img').naturalWidth > 0")
    ids = [int(i) for i in page.locator("#results .result").evaluate_all("els => els.map(e => e.dataset.id)")]
    assert ids[0] == clicked  # the clicked image finds itself first: it is the query now
    assert len(ids) == min(K, len(searcher))
    assert page.locator("#duplicate-note").is_visible()


def test_a_non_image_shows_an_error_in_plain_words(page, tmp_path: Path) -> None:  # noqa: ANN001
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not an image")
    page.set_input_files("#file", str(notes))
    error = page.locator("#error")
    error.wait_for(state="visible")
    assert "image" in error.inner_text().lower()
    page.screenshot(path=str(SCREENSHOT.with_name("imgsim-web-error.png")))
