"""Where the daemon listens by default, so `submit` and `status` find it without flags."""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path
from urllib.parse import urlparse

ENV_ENDPOINT = "PSPNET_ENDPOINT"


def runtime_dir() -> Path:
    """A 0700 directory of this user's: $XDG_RUNTIME_DIR/pspnet or /tmp/pspnet-UID."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base) / "pspnet" if base else Path(f"/tmp/pspnet-{os.getuid()}")
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    # /tmp is shared: a directory planted there by someone else (or a link to one) must not
    # receive our socket (root's chmod would succeed, and its owner could chmod it back).
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a directory"
        raise PermissionError(
            f"{path} is {what} owned by uid {st.st_uid}, not a directory of this user's: "
            "refusing to put the daemon's socket there (set XDG_RUNTIME_DIR, or pass "
            "--endpoint)")
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
