"""The Ray Serve application: a FastAPI ingress in front of one `Searcher` per replica.

HTTP API (docs/serving.md has curl examples):
    POST /search?k=N     image as multipart field `image`, raw body (Content-Type image/*), or JSON
                         {"url": ..., "k": N} -> {"query", "cluster", "results", "took_ms"}
    POST /duplicates     the same inputs -> {"query", "duplicate", "threshold", "threshold_source",
                         "matches": [{"id", "path", "distance", "exact"}], "took_ms"} (k caps matches)
    GET  /images/{id}    the indexed image's bytes (ids are row numbers; nothing else is served)
    GET  /healthz        {"status": "ok", "images": N} (also HEAD)
    GET  /               the web page (serve/static/) (also HEAD)

The ingress only parses and validates: queries become preprocessed arrays in the request path
(`Searcher.to_image`), then `@serve.batch` stacks concurrent ones into a single
`Searcher.search_preprocessed` call. Bad input is always a JSON 4xx, never a 500, and no request
holds more than a bounded amount of memory: bodies are capped (size, and time to arrive), JSON
bodies too, a query's pixels are capped and large queries decode a few at a time (`serve.guards`).
Interactive API docs (/docs, /openapi.json) are off: docs/serving.md documents the API.

Entry points: `build_app(run, ...)` (Python), `app_builder(args)` (`serve run serve/config.yaml`),
`run(run, host, port, ...)` (`imgsim serve`).
"""

# No `from __future__ import annotations` here: FastAPI must see real annotation objects on the
# route methods, and Serve's class-based ingress rewrites their signatures.
import asyncio
import hmac
import json
import logging
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from imgsim.config import DEFAULTS, MAX_IMAGE_PIXELS
from imgsim.console import output as console
from imgsim.data.rows import content_hash
from imgsim.errors import BadQuery, ImgsimError, RunNotFound
from imgsim.io.runs import RunPaths
from serve.guards import LargeDecodes, PathShown, bound_allocator, release_memory

logger = logging.getLogger("ray.serve")

STATIC_DIR = Path(__file__).resolve().parent / "static"
APP_NAME = "imgsim"
DEPLOYMENT_NAME = "ImgsimSearch"
API_KEY_ENV = "IMGSIM_API_KEY"
RUN_ENV = "IMGSIM_RUN"
METRICS_PORT_ENV = "IMGSIM_METRICS_PORT"  # Prometheus port of the local Ray instance `run` starts

# Batching: the batcher waits at most BATCH_WAIT_TIMEOUT_S for a batch to fill, so a lone request
# pays that once; under load, queries queue while the previous batch computes and batches fill.
MAX_BATCH_SIZE = 32
BATCH_WAIT_TIMEOUT_S = 0.001
MAX_ONGOING_REQUESTS = 128
INLINE_DECODE_BYTES = 64 * 1024  # bodies up to this size are decoded on the event loop

_INT_TEXT = re.compile(r"\s*[+-]?[0-9]{1,9}\s*")
_IMAGE_ID = re.compile(r"[0-9]{1,12}")


class ApiError(Exception):
    """An expected failure answered as JSON `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _shown(value: object, limit: int = 40) -> str:
    """A short, safe description of a client's value for an error message (no deep repr)."""
    if isinstance(value, str | int | float | bool) or value is None:
        text = repr(value)
        return text if len(text) <= limit else text[: limit - 1] + "…"
    return f"a JSON {'object' if isinstance(value, dict) else 'array' if isinstance(value, list) else type(value).__name__}"


def parse_k(value: object, max_k: int, default: int = DEFAULTS.search.k) -> int:
    """Validate the number of results asked for: a whole number in 1..max_k, else `ApiError(400)`."""
    if value is None:
        return min(default, max_k)
    k: int | None = None
    if isinstance(value, bool):
        k = None
    elif isinstance(value, int):
        k = value
    elif isinstance(value, str) and _INT_TEXT.fullmatch(value):
        k = int(value)
    if k is None:
        raise ApiError(400, f"k must be a whole number between 1 and {max_k}, got {_shown(value)}")
    if not 1 <= k <= max_k:
        raise ApiError(400, f"k must be between 1 and {max_k}, got {k}")
    return k


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_body_limited(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) more than `limit` bytes: by Content-Length before reading,
    and by counting while reading (chunked uploads carry no Content-Length)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, f"invalid Content-Length header {_shown(declared)}") from None
        if size > limit:
            raise ApiError(413, f"request body is {size} bytes; the limit is {limit} bytes")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _multipart_image(request: Request, body: bytes) -> tuple[bytes, str, str | None]:
    """(image bytes, file name, form field k) from an already size-checked multipart body."""

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    form_request = Request(request.scope, replay)
    try:
        form = await form_request.form(max_files=4, max_fields=16)
    except Exception as e:  # python-multipart and Starlette raise several types for malformed bodies
        raise ApiError(400, f"malformed multipart body: {e}") from None
    try:
        field = form.get("image")
        if field is None or isinstance(field, str):
            raise ApiError(400, "the multipart body has no file field named 'image'")
        data = await field.read()
        k_field = form.get("k")
        return data, field.filename or "upload", k_field if isinstance(k_field, str) else None
    finally:
        await form.close()


def _check_api_key(request: Request, api_key: str | None) -> None:
    """401 unless the request carries `Authorization: Bearer <api_key>` (when a key is configured)."""
    if not api_key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode("utf-8", "surrogateescape"), api_key.encode("utf-8")
    ):
        raise ApiError(
            401,
            "this server needs an API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": 'Bearer realm="imgsim"'},
        )


def _fetch_status(error: Exception) -> int:
    """The HTTP status for a failed URL fetch: the fetcher's hint when it is a 4xx or 502-504."""
    for attr in ("status", "status_code", "http_status"):
        hint = getattr(error, attr, None)
        if isinstance(hint, int) and (400 <= hint < 500 or 502 <= hint <= 504):
            return hint
    return 400


def _data_root(run: str | os.PathLike[str]) -> str | None:
    """The folder (or s3:// prefix) the run's index was built from, as its manifest records it."""
    try:
        data = json.loads(RunPaths(run).manifest.read_text()).get("data")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, str) and data else None


api = FastAPI(
    title="imgsim",
    description="Image-similarity search over an indexed image collection.",
    # No interactive docs: /docs loads its script from a public CDN (blank offline) and would be
    # served without the API key. docs/serving.md documents every endpoint.
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)
api.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


@api.exception_handler(ApiError)
async def _api_error_handler(request: Request, exc: ApiError) -> JSONResponse:
    return _error(exc.status, exc.message, exc.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no such endpoint: {request.method} {request.url.path}"
    return _error(exc.status_code, message, getattr(exc, "headers", None))


@api.exception_handler(RequestValidationError)
async def _validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
    return _error(400, "bad request: " + "; ".join(parts))


@api.exception_handler(Exception)
async def _unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s %s", request.method, request.url.path)
    return _error(500, f"internal error ({type(exc).__name__}); the server log has the details")


# Everything the routes use must be defined above this point: `@serve.ingress` snapshots the
# FastAPI app (and with it these methods' globals) when the class is decorated.
@serve.deployment(
    name=DEPLOYMENT_NAME,
    max_ongoing_requests=MAX_ONGOING_REQUESTS,
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
)
@serve.ingress(api)
class ImgsimSearch:
    """One replica: the run's model and index loaded once; routes parse, validate and call it."""

    def __init__(
        self,
        run: str,
        *,
        allow_private_urls: bool = False,
        max_body_bytes: int = DEFAULTS.serve.max_body_bytes,
        max_k: int = DEFAULTS.serve.max_k,
        url_timeout_s: float = DEFAULTS.serve.url_timeout_s,
        api_key: str | None = None,
        max_batch_size: int = MAX_BATCH_SIZE,
        batch_wait_timeout_s: float = BATCH_WAIT_TIMEOUT_S,
        torch_threads: int = 1,
        paths: str = DEFAULTS.serve.paths,
        max_query_pixels: int = DEFAULTS.serve.max_query_pixels,
        large_decodes: int = DEFAULTS.serve.large_decodes,
        max_json_bytes: int = DEFAULTS.serve.max_json_bytes,
        body_timeout_s: float = DEFAULTS.serve.body_timeout_s,
    ) -> None:
        import torch

        from imgsim.duplicates.lookup import DuplicateLookup
        from imgsim.index.knn import set_threads
        from imgsim.index.search import Searcher

        # Intra-op threads for the model and the KNN search: one per reserved CPU. More only
        # oversubscribes the cores (OpenMP threads spin while they wait).
        torch.set_num_threads(max(1, torch_threads))
        set_threads(max(1, torch_threads))
        bound_allocator()  # freed pixel buffers go back to the kernel (serve.guards)
        self.searcher = Searcher.load(run, device="cpu", allow_private_urls=allow_private_urls)
        self.duplicate_lookup = DuplicateLookup(self.searcher)
        self.show_path = PathShown.for_paths(paths, _data_root(run), self.searcher.paths)
        self.size = len(self.searcher)
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a Serve replica (a unit test of the class)
            self.replica = f"pid-{os.getpid()}"
        self.allow_private_urls = allow_private_urls
        self.max_body_bytes = max_body_bytes
        self.max_k = max_k
        self.url_timeout_s = url_timeout_s
        self.api_key = api_key or os.environ.get(API_KEY_ENV) or None
        self.max_query_pixels = min(max_query_pixels, MAX_IMAGE_PIXELS)
        self.large_decodes = LargeDecodes(large_decodes)
        self.max_json_bytes = max_json_bytes
        self.body_timeout_s = body_timeout_s
        self._search_batch.set_max_batch_size(max_batch_size)
        self._search_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        logger.info("imgsim: loaded %s (%d images)", run, self.size)

    # --- pages and health ---------------------------------------------------------------------

    @api.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index_page(self) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @api.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz(self) -> dict[str, Any]:
        """Liveness and readiness: answers once the index is loaded; `replica` names the replica that
        answered (which one a load balancer picked, and when a new one took over)."""
        return {"status": "ok", "images": self.size, "replica": self.replica}

    # --- search -------------------------------------------------------------------------------

    @api.post("/search")
    async def search(self, request: Request) -> JSONResponse:
        """Top-k similar images for an uploaded image (multipart or raw body) or an image URL."""
        started = time.perf_counter()
        data, query, k = await self._read_query(request)
        image = await self._decode(data, query)
        answer = await self._search_batch((image, k))
        for result in answer["results"]:
            result["path"] = self.show_path(result["path"])
        took_ms = (time.perf_counter() - started) * 1000.0
        return JSONResponse({"query": query, **answer, "took_ms": round(took_ms, 3)})

    @api.post("/duplicates")
    async def duplicates(self, request: Request) -> JSONResponse:
        """Is the image (same inputs as /search) a duplicate of indexed ones? Every indexed image
        within the run's calibrated threshold (k caps the matches), byte-identical files first."""
        started = time.perf_counter()
        data, query, k = await self._read_query(request, default_k=DEFAULTS.duplicates.max_matches)

        def answer_of(image: np.ndarray) -> dict[str, Any]:
            # verification decodes the query's bytes once more: for a large query, still in its slot
            return self.duplicate_lookup.duplicates_of_preprocessed(
                image, content_hash(data), None, k, data=data
            )

        answer = await self._decode(data, query, then=answer_of)
        for match in answer["matches"]:
            match["path"] = self.show_path(match["path"])
        took_ms = (time.perf_counter() - started) * 1000.0
        return JSONResponse({"query": query, **answer, "took_ms": round(took_ms, 3)})

    async def _read_query(
        self, request: Request, default_k: int = DEFAULTS.search.k
    ) -> tuple[bytes, str, int]:
        """(image bytes, query name, k) of a query request, after the API key check; every bad input
        is an ApiError (4xx)."""
        _check_api_key(request, self.api_key)
        media = _media_type(request)
        kind = (
            "multipart"
            if media == "multipart/form-data"
            else "raw"
            if media.startswith("image/") or media == "application/octet-stream"
            else "json"
            if media == "application/json" or media.endswith("+json")
            else None
        )
        if kind is None:
            raise ApiError(
                415,
                f"unsupported Content-Type {media or '(none)'!r}: send the image as multipart field "
                '\'image\', as a raw body with Content-Type image/*, or JSON {"url": ..., "k": N}',
            )
        k_param = request.query_params.get("k")
        k = parse_k(k_param, self.max_k, default_k)  # validated before reading the body
        limit = self.max_json_bytes if kind == "json" else self.max_body_bytes
        try:
            body = await asyncio.wait_for(read_body_limited(request, limit), self.body_timeout_s)
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.body_timeout_s:g} s") from None
        if kind == "multipart":
            data, query, k_field = await _multipart_image(request, body)
            if k_param is None and k_field is not None:
                k = parse_k(k_field, self.max_k)
        elif kind == "raw":
            data, query = body, "upload"
        else:
            url, k_json = self._parse_json_query(body)
            if k_json is not None:
                k = parse_k(k_json, self.max_k)
            data, query = await self._fetch(url), url
        if not data:
            raise ApiError(400, "the image is empty")
        return data, query, k

    async def _decode(self, data: bytes, query: str, then: Any = None) -> Any:
        """The preprocessed image of `data` (or `then(image)`): refused (413) over the pixel cap; a
        large image waits for one of the replica's large-decode slots and its memory is handed back
        after; a small one decodes on the event loop (cheaper than a thread hop)."""
        from imgsim.data.decode import STRIP_REDUCE_PIXELS, image_size_of

        def work() -> Any:
            image = self._to_image(data, query)
            return image if then is None else then(image)

        size = image_size_of(data)
        pixels = size[0] * size[1] if size else 0
        if pixels > self.max_query_pixels:
            raise ApiError(
                413,
                f"image too large ({size[0]}x{size[1]} pixels; this server's limit for a query is "
                f"{self.max_query_pixels:,} pixels): decompression bomb guard",
            )
        if pixels > STRIP_REDUCE_PIXELS:
            async with self.large_decodes.semaphore():
                try:
                    return await asyncio.to_thread(work)
                finally:
                    await asyncio.to_thread(release_memory)
        if len(data) <= INLINE_DECODE_BYTES and then is None:
            return work()
        return await asyncio.to_thread(work)

    @staticmethod
    def _parse_json_query(body: bytes) -> tuple[str, object]:
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        except RecursionError:
            raise ApiError(400, "the JSON body is nested too deeply") from None
        if not isinstance(payload, dict):
            raise ApiError(400, 'the JSON body must be an object like {"url": "https://...", "k": 10}')
        url = payload.get("url")
        if not isinstance(url, str) or not url.strip():
            raise ApiError(400, 'the JSON body needs "url": an http(s) address of an image')
        return url.strip(), payload.get("k")

    async def _fetch(self, url: str) -> bytes:
        from imgsim.data.fetch import FetchError, fetch_url

        try:
            return await asyncio.to_thread(
                fetch_url,
                url,
                max_bytes=self.max_body_bytes,
                timeout_s=self.url_timeout_s,
                allow_private=self.allow_private_urls,
            )
        except FetchError as e:
            raise ApiError(_fetch_status(e), str(e)) from None

    def _to_image(self, data: bytes, query: str) -> np.ndarray:
        """Bytes -> the model's preprocessed uint8 (C, S, S) array; refusals become 400s."""
        from imgsim.data.decode import DecodeError

        try:
            return self.searcher.to_image(data, max_pixels=self.max_query_pixels)
        except (BadQuery, DecodeError) as e:
            raise ApiError(400, f"could not read {query} as an image: {e.reason}") from None

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_TIMEOUT_S)
    async def _search_batch(self, queries: list[tuple[np.ndarray, int]]) -> list[dict[str, Any]]:
        """Embed and search a batch of preprocessed queries in one model call (off the event loop)."""
        images = np.stack([image for image, _ in queries])
        k_max = max(k for _, k in queries)
        answers = await asyncio.to_thread(self.searcher.search_preprocessed, images, k_max)
        return [
            {"cluster": answer["cluster"], "results": answer["results"][:k]}
            for answer, (_, k) in zip(answers, queries, strict=True)
        ]

    # --- images -------------------------------------------------------------------------------

    @api.get("/images/{image_id}")
    async def image(self, image_id: str, request: Request) -> Response:
        """An indexed image's bytes, by its integer id (row number); nothing else is reachable."""
        _check_api_key(request, self.api_key)
        if not _IMAGE_ID.fullmatch(image_id) or int(image_id) >= self.size:
            raise ApiError(404, f"no indexed image with id {image_id!r} (ids are 0..{self.size - 1})")
        try:
            data, content_type = await asyncio.to_thread(self.searcher.image_bytes, int(image_id))
        except (IndexError, KeyError):
            raise ApiError(404, f"no indexed image with id {image_id}") from None
        except (OSError, ImgsimError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
            raise ApiError(404, f"indexed image {image_id} can no longer be read ({reason})") from None
        if not content_type or not content_type.startswith("image/"):
            content_type = "application/octet-stream"
        return Response(
            data,
            media_type=content_type,
            headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"},
        )


# --- building and running -----------------------------------------------------------------------


def build_app(
    run: str | os.PathLike[str],
    *,
    replicas: int = DEFAULTS.serve.replicas,
    allow_private_urls: bool = DEFAULTS.serve.allow_private_urls,
    max_body_bytes: int = DEFAULTS.serve.max_body_bytes,
    max_k: int = DEFAULTS.serve.max_k,
    url_timeout_s: float = DEFAULTS.serve.url_timeout_s,
    api_key: str | None = None,
    num_cpus: float = 1.0,
    max_ongoing_requests: int = MAX_ONGOING_REQUESTS,
    max_batch_size: int = MAX_BATCH_SIZE,
    batch_wait_timeout_s: float = BATCH_WAIT_TIMEOUT_S,
    paths: str = DEFAULTS.serve.paths,
    **limits: Any,
) -> serve.Application:
    """A bound Serve application for the run directory `run` (pass it to `serve.run`).

    `api_key` defaults to the IMGSIM_API_KEY environment variable of the calling process. `paths`:
    how results show paths (`PATHS_CHOICES`); `limits`: any of `ImgsimSearch`'s other limits
    (max_query_pixels, large_decodes, max_json_bytes, body_timeout_s), defaults in `ServeConfig`.
    """
    PathShown(paths, None)  # an unknown choice fails here, not in the replica
    run_dir = _check_run(run)
    return ImgsimSearch.options(
        num_replicas=replicas,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": num_cpus},
    ).bind(
        str(run_dir),
        allow_private_urls=allow_private_urls,
        max_body_bytes=max_body_bytes,
        max_k=max_k,
        url_timeout_s=url_timeout_s,
        api_key=api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None,
        max_batch_size=max_batch_size,
        batch_wait_timeout_s=batch_wait_timeout_s,
        torch_threads=max(1, int(num_cpus)),
        paths=paths,
        **limits,
    )


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Builder for `serve run serve/config.yaml`: `args` may hold `run` (else $IMGSIM_RUN) and any
    `ImgsimSearch` option (allow_private_urls, max_body_bytes, max_k, url_timeout_s, max_batch_size,
    batch_wait_timeout_s, torch_threads, paths, max_query_pixels, large_decodes, max_json_bytes,
    body_timeout_s). Replicas and resources come from the config's
    `deployments:` section."""
    options = dict(args)
    run_dir = options.pop("run", None) or os.environ.get(RUN_ENV)
    if not run_dir:
        raise RunNotFound(f"no run directory: set args.run in the Serve config or ${RUN_ENV}")
    return ImgsimSearch.bind(str(_check_run(run_dir)), **options)


def _check_run(run: str | os.PathLike[str]) -> Path:
    """The run directory, absolute, after checking it holds a model and an index."""
    paths = RunPaths(Path(run).expanduser().resolve())
    if not paths.model_dir.is_dir():
        raise RunNotFound(f"{paths.root} has no model yet: run `imgsim train DATA --out {run}` first")
    if not paths.embeddings.is_file():
        raise RunNotFound(f"{paths.root} has no index yet: run `imgsim index DATA --model {run}` first")
    return paths.root


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ImgsimError(
                f"cannot listen on {host}:{port} ({e.strerror}); choose another --port"
            ) from None


def start(
    run: str | os.PathLike[str],
    *,
    host: str = DEFAULTS.serve.host,
    port: int = DEFAULTS.serve.port,
    route_prefix: str = "/",
    access_log: bool = False,
    **options: Any,
) -> DeploymentHandle:
    """Start Serve's HTTP proxy on host:port and deploy the app (Ray must be initialised).

    `access_log`: Serve logs a line per request ("POST /search 200 18.9ms"); off by default.
    """
    app = build_app(run, **options)
    logging_config = {"enable_access_log": access_log}
    http_options = {
        "host": host,
        "port": port,
        "request_timeout_s": DEFAULTS.serve.request_timeout_s,
        "keep_alive_timeout_s": DEFAULTS.serve.keep_alive_timeout_s,
    }
    serve.start(http_options=http_options, logging_config=logging_config)
    return serve.run(app, name=APP_NAME, route_prefix=route_prefix, logging_config=logging_config)


def run(
    run: str | os.PathLike[str],
    host: str = DEFAULTS.serve.host,
    port: int = DEFAULTS.serve.port,
    replicas: int = DEFAULTS.serve.replicas,
    allow_private_urls: bool = DEFAULTS.serve.allow_private_urls,
    ingress: str = "Serve's HTTP proxy",
    access_log: bool = False,
    paths: str = DEFAULTS.serve.paths,
) -> None:
    """Serve `run` on http://host:port/ until Ctrl-C or SIGTERM, then shut Serve and Ray down.

    `ingress` only names the HTTP front end in the start-up line: it is chosen by the environment
    the Ray processes start with (`serve.ingress.apply`, which `imgsim serve` calls). `access_log`:
    Serve logs a line per request (`imgsim serve --access-log` shows them on the console; Serve's
    and Ray's other logs go to RUN/logs/ only, unless `--verbose`: `imgsim.console.output`).

    Starts a local Ray instance (Prometheus metrics on $IMGSIM_METRICS_PORT when set) unless
    RAY_ADDRESS names a cluster to join.
    """
    import ray

    _check_run(run)
    _check_port_free(host, port)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    started_ray = not ray.is_initialized()
    # Our own local cluster is ours to tear down; on a shared one we only remove our application.
    own_cluster = started_ray and not os.environ.get("RAY_ADDRESS")
    try:
        if started_ray:
            metrics_port = os.environ.get(METRICS_PORT_ENV)
            ray.init(
                address=os.environ.get("RAY_ADDRESS") or "local",
                configure_logging=False,
                log_to_driver=console.verbose(),
                _metrics_export_port=int(metrics_port) if metrics_port else None,
            )
            console.ray_started()
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        start(
            run,
            host=host,
            port=port,
            replicas=replicas,
            allow_private_urls=allow_private_urls,
            num_cpus=min(1.0, cpus / replicas),
            access_log=access_log,
            paths=paths,
        )
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
        print(f"imgsim: serving {run} at http://{shown}:{port}/ via {ingress} (Ctrl-C to stop)", flush=True)
        while not stop.wait(0.5):
            pass
        print("imgsim: shutting down", file=console.stream(), flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if ray.is_initialized():
            if own_cluster:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
            if started_ray:
                ray.shutdown()
