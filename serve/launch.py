"""`imgsim serve`: choose the HTTP front end, then start the Serve app until interrupted.

The front end is chosen through the environment Ray's processes start with (`serve.ingress`), so
it is applied here before `serve.app` (and with it `ray.serve`) is imported. Joining a cluster at
RAY_ADDRESS, the cluster's own environment decides.
"""

from __future__ import annotations

import argparse
import os

from imgsim.config import DEFAULTS, INGRESS_CHOICES, PATHS_CHOICES
from imgsim.console.arguments import add_model, positive_int
from imgsim.console.command import Command, existing_run


def serve_forever(
    run: str,
    *,
    host: str = DEFAULTS.serve.host,
    port: int = DEFAULTS.serve.port,
    replicas: int = DEFAULTS.serve.replicas,
    allow_private_urls: bool = DEFAULTS.serve.allow_private_urls,
    ingress: str = DEFAULTS.serve.ingress,
    access_log: bool = False,
    paths: str = DEFAULTS.serve.paths,
) -> None:
    """Serve `run` at http://host:port/ until Ctrl-C or SIGTERM."""
    from serve import ingress as front_end

    if os.environ.get("RAY_ADDRESS"):
        chosen = "as configured on the cluster at RAY_ADDRESS"
    else:  # our own local Ray: its processes inherit this environment
        chosen = front_end.apply(ingress)
    from serve.app import run as run_app

    run_app(
        run,
        host=host,
        port=port,
        replicas=replicas,
        allow_private_urls=allow_private_urls,
        ingress=chosen,
        access_log=access_log,
        paths=paths,
    )


def arguments(p: argparse.ArgumentParser) -> None:
    s = DEFAULTS.serve
    add_model(p)
    p.add_argument("--host", default=s.host, help="address to listen on")
    p.add_argument("--port", type=positive_int, default=s.port, help="port to listen on")
    p.add_argument(
        "--replicas",
        type=positive_int,
        default=s.replicas,
        help="copies of the search service (Serve replicas)",
    )
    p.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="let URL queries reach private, loopback and link-local addresses (off: URLs pointing inside your network are refused)",
    )
    p.add_argument(
        "--ingress",
        choices=INGRESS_CHOICES,
        default=s.ingress,
        help="HTTP front end: 'haproxy' (HAProxy in front of the replicas, faster: docs/serving.md), "
        "'proxy' (Ray Serve's own HTTP proxy), 'auto' (haproxy when installed)",
    )
    p.add_argument("--access-log", action="store_true", help="print a line per HTTP request")
    p.add_argument(
        "--paths",
        choices=PATHS_CHOICES,
        default=DEFAULTS.serve.paths,
        help="how answers show an image's path: relative to the indexed folder, the server's absolute path, or none",
    )


def run(args: argparse.Namespace) -> int:
    serve_forever(
        args.model,
        host=args.host,
        port=args.port,
        replicas=args.replicas,
        allow_private_urls=args.allow_private_urls,
        ingress=args.ingress,
        access_log=args.access_log,
        paths=args.paths,
    )
    return 0


COMMAND = Command(
    "serve",
    "serve search over HTTP (Ray Serve) with a web page",
    "Run the Ray Serve app until interrupted: POST /search, POST /duplicates, GET /images/{id}, "
    "GET /healthz (also HEAD) and a "
    "web page at /. Set IMGSIM_API_KEY to require 'Authorization: Bearer <key>'.",
    arguments,
    run,
    run_dir=lambda a: existing_run(a.model),
)
