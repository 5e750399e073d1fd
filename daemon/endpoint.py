"""Where the daemon listens by default, so `submit` and `status` find it without flags."""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import json
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

ENV_ENDPOINT = "PSPNET_ENDPOINT"
IPC_PATH_MAX = 107              # bytes in a unix socket's name (sun_path, less its NUL)
PROBE_TIMEOUT_S = 1.0
# What is at an ipc socket's path (ipc_state)
ABSENT, STALE, LISTENING, NOT_A_SOCKET = "absent", "stale", "listening", "not a socket"


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


@dataclass(frozen=True)
class Endpoint:
    """A daemon endpoint, checked: ipc://PATH or tcp://HOST:PORT."""

    url: str
    scheme: str                  # ipc | tcp
    path: str | None = None      # ipc: the socket's path ("@name": Linux abstract, no file)
    host: str | None = None      # tcp: name, address, [IPv6] or * (bind only)
    port: int | None = None

    @property
    def socket_file(self) -> Path | None:
        """The ipc socket's file; None for tcp and for abstract ipc names."""
        if self.scheme != "ipc" or self.path is None or self.path.startswith("@"):
            return None
        return Path(self.path)


def parse_endpoint(url: str) -> Endpoint:
    """Check an endpoint before any socket exists (ZeroMQ's own refusal is a traceback that
    says only 'Invalid argument'); ValueError says what is wrong."""
    def bad(why: str = "") -> ValueError:
        return ValueError(f"endpoints are ipc://PATH or tcp://HOST:PORT, not {url!r}"
                          + (f" ({why})" if why else ""))

    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("ipc", "tcp"):
        raise bad()
    if any(c.isspace() or c == "\x00" for c in rest):
        raise bad("spaces or NUL")
    if scheme == "ipc":
        if not rest:
            raise bad("no path")
        if rest.endswith("/") or Path(rest).name in ("", ".", ".."):
            raise bad("the path names a directory, not a socket file in one")
        if len(rest.encode()) > IPC_PATH_MAX:
            raise bad(f"the path has {len(rest.encode())} bytes; a unix socket's name holds "
                      f"at most {IPC_PATH_MAX}")
        return Endpoint(url, scheme, path=rest)
    host, colon, port = rest.rpartition(":")
    if not colon or not host or not (port.isascii() and port.isdigit()) \
            or not 1 <= int(port) <= 65535:
        raise bad("a host, then a port from 1 to 65535")
    if "/" in host or ";" in host or (":" in host and not (host.startswith("[")
                                                          and host.endswith("]"))):
        raise bad("an IPv6 address goes in brackets: tcp://[::1]:PORT")
    return Endpoint(url, scheme, host=host, port=int(port))


def ipc_state(path: Path) -> str:
    """ABSENT, NOT_A_SOCKET, STALE (a socket file nobody listens on: its daemon died) or
    LISTENING. A plain connect tells at once, refused or taken, without speaking ZeroMQ;
    anything unclear (no permission, a full backlog) counts as LISTENING: not ours."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return ABSENT
    except OSError:
        return LISTENING
    if not stat.S_ISSOCK(st.st_mode):
        return NOT_A_SOCKET
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # connect only, then closed
    probe.settimeout(PROBE_TIMEOUT_S)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        return STALE
    except FileNotFoundError:
        return ABSENT
    except OSError:
        return LISTENING
    finally:
        probe.close()
    return LISTENING


class EndpointLocked(Exception):
    """Another serve holds the ipc path's lock: it is starting or serving there."""

    def __init__(self, lock: Path, holder: int | None) -> None:
        who = f" (pid {holder})" if holder is not None else ""
        super().__init__(f"another pspnet serve{who} is starting or serving there "
                         f"(it holds {lock})")


def lock_file(socket_file: Path) -> Path:
    return Path(f"{socket_file}.lock")


def lock_socket_file(socket_file: Path) -> int:
    """Hold SOCKET.lock (flock) while the returned descriptor is open. Without it two serves
    started in the same instant can both find the path free, and the later bind silently
    takes it from the earlier. The kernel drops the lock when its holder dies, so a file
    left by a kill -9 stops nobody. Raises EndpointLocked, or OSError (cannot create it)."""
    lock = lock_file(socket_file)
    while True:
        # never through a link: the pid is written into whatever is opened
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file", str(lock))
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _live_pid(os.read(fd, 32))
            os.close(fd)
            raise EndpointLocked(lock, holder) from None
        except OSError:
            os.close(fd)
            raise
        if _same_file(lock, fd):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)       # its last holder removed it as we opened it: lock the new one


def unlock_socket_file(socket_file: Path, fd: int) -> None:
    """Remove the lock file while still holding it (so nobody locks a file on its way
    out), then let go."""
    lock = lock_file(socket_file)
    try:
        if _same_file(lock, fd):
            lock.unlink()
    finally:
        os.close(fd)


def _live_pid(text: bytes) -> int | None:
    """The holder's pid, if the file names a live process: it writes it just after it
    locks, so a loser can read nothing yet, or the pid of a dead earlier holder."""
    try:
        pid = int(text.decode().strip())
        os.kill(pid, 0)
    except (ValueError, UnicodeDecodeError, ProcessLookupError):
        return None
    except PermissionError:       # alive, another user's
        pass
    return pid


def _same_file(path: Path, fd: int) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def is_local(endpoint: str) -> bool:
    """An ipc path (its file's permissions keep other users out) and loopback tcp:// are
    local; an abstract ipc name (ipc://@name: no file, any local user may connect) and
    anything else reachable from other hosts is not. ValueError for a malformed endpoint."""
    target = parse_endpoint(endpoint)
    if target.scheme == "ipc":
        return target.socket_file is not None
    host = urlparse(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---- this user's running daemons: one small file each, so a client that finds nobody at
# the default endpoint can say where they are (a daemon on tcp is not at the ipc path)

def daemons_dir() -> Path:
    return runtime_dir() / "daemons"


def record_daemon(endpoint: str) -> Path | None:
    """Write DAEMONS/PID.json ({"pid", "endpoint"}) for `running_daemons`; None if it
    cannot be written (the daemon serves all the same)."""
    try:
        folder = daemons_dir()
        folder.mkdir(mode=0o700, exist_ok=True)
        path = folder / f"{os.getpid()}.json"
        path.write_text(json.dumps({"pid": os.getpid(), "endpoint": endpoint}) + "\n")
    except OSError:
        return None
    return path


def forget_daemon(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)


def running_daemons() -> list[tuple[int, str]]:
    """(pid, endpoint) of this user's daemons that are alive; files of dead ones (a kill
    -9 leaves them) are removed."""
    try:
        files = sorted(daemons_dir().glob("*.json"))
    except OSError:
        return []
    found = []
    for path in files:
        try:
            doc = json.loads(path.read_text())
            pid, endpoint = int(doc["pid"]), str(doc["endpoint"])
            os.kill(pid, 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        found.append((pid, endpoint))
    return found


def where_daemons_are(endpoint: str) -> str:
    """What to add to 'no daemon at ENDPOINT': how to name another endpoint, and this
    user's running daemons, if any."""
    others = [f"{url} (pid {pid})" for pid, url in running_daemons() if url != endpoint]
    listed = f"; running: {', '.join(others)}" if others else \
        "; is `pspnet serve` running?"
    return (f" (a daemon elsewhere, e.g. on tcp: pass --endpoint tcp://HOST:PORT or set "
            f"{ENV_ENDPOINT}{listed})")
