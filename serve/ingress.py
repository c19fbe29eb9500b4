"""Which HTTP ingress Ray Serve uses: its Python HTTP proxy, or HAProxy in front of the replicas.

Ray Serve 2.60 can put HAProxy (C) in front of the ingress replicas, which then serve HTTP
themselves (`RAY_SERVE_ENABLE_HA_PROXY=1`, "direct ingress"). Serve's own Python proxy costs CPU
per request and an actor call back to it for every request, so HAProxy serves several times the
queries per second (`python -m bench.serve`; docs/serving.md and docs/scaling.md have the figures).

Ray reads these settings from the environment of its processes when they start, so they must be
in place before `ray.init` starts a local cluster (and before `ray.serve` is imported here); a
cluster started elsewhere uses whatever its own environment says. This module imports no Ray.
"""

from __future__ import annotations

import os
import shutil

from imgsim.config import INGRESS_CHOICES
from imgsim.errors import ImgsimError

_HAPROXY_PATHS = ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy")


def find_haproxy() -> str | None:
    """The HAProxy binary Ray Serve would run: $RAY_SERVE_HAPROXY_BINARY_PATH, PATH, /usr/sbin."""
    explicit = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    found = shutil.which("haproxy")
    if found:
        return found
    return next((p for p in _HAPROXY_PATHS if os.access(p, os.X_OK)), None)


def resolve(ingress: str) -> str:
    """ "haproxy" or "proxy" for a CLI choice; "auto" is HAProxy when it is installed."""
    if ingress not in INGRESS_CHOICES:
        raise ImgsimError(f"unknown ingress {ingress!r}: choose one of {', '.join(INGRESS_CHOICES)}")
    if ingress == "auto":
        return "haproxy" if find_haproxy() else "proxy"
    if ingress == "haproxy" and not find_haproxy():
        raise ImgsimError(
            "--ingress haproxy needs the haproxy binary (apt-get install haproxy, or set "
            "RAY_SERVE_HAPROXY_BINARY_PATH); or use --ingress proxy"
        )
    return ingress


def environment(ingress: str) -> dict[str, str]:
    """The environment variables that select `ingress` (any CLI choice) for Ray Serve."""
    if resolve(ingress) == "proxy":
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(find_haproxy()),
        "RAY_SERVE_HAPROXY_NBTHREAD": str(min(4, os.cpu_count() or 1)),
        # Replicas drain for at least this long on shutdown (Ray's default: 30 s, for clusters
        # behind a load balancer); a local `imgsim serve` stops on Ctrl-C.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    }


def apply(ingress: str) -> str:
    """Put `ingress`'s settings into this process's environment (before Ray starts); return the
    front end chosen, "haproxy" or "proxy"."""
    env = environment(ingress)
    os.environ.update(env)
    return "haproxy" if env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" else "proxy"
