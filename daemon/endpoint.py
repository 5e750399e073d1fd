"""Where the daemon listens by default, so `submit` and `status` find it without flags."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from urllib.parse import urlparse

ENV_ENDPOINT = "PSPNET_ENDPOINT"


def runtime_dir() -> Path:
    """A 0700 directory of this user's: $XDG_RUNTIME_DIR/pspnet or /tmp/pspnet-UID."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base) / "pspnet" if base else Path(f"/tmp/pspnet-{os.getuid()}")
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def default_endpoint() -> str:
    return os.environ.get(ENV_ENDPOINT) or f"ipc://{runtime_dir()}/front"


def is_local(endpoint: str) -> bool:
    """ipc:// and loopback tcp:// are local; anything else is reachable from other hosts."""
    url = urlparse(endpoint)
    if url.scheme in ("ipc", "inproc"):
        return True
    if url.scheme != "tcp":
        raise ValueError(f"endpoint must be ipc://PATH or tcp://HOST:PORT, not {endpoint!r}")
    host = url.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
