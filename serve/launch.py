"""`imgsim serve`: choose the HTTP front end, then start the Serve app until interrupted.

The front end is chosen through the environment Ray's processes start with (`serve.ingress`), so
it is applied here before `serve.app` (and with it `ray.serve`) is imported. Joining a cluster at
RAY_ADDRESS, the cluster's own environment decides.
"""

from __future__ import annotations

import os

from imgsim.config import DEFAULTS


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
