"""The client endpoint: claimed, bound, counted, released.

Bound before any worker starts, so a taken or malformed endpoint fails in a second. An ipc
socket file that a live daemon answers on is refused (ZeroMQ would silently take the path
and leave that daemon unreachable), one nobody listens on (left by a crash) is replaced,
and `SOCKET.lock` is held from the check until the file is removed at exit, so two serves
started at once cannot both take the path.

Descriptors: the soft RLIMIT_NOFILE is raised to the hard limit, and client connections are
counted (a ZeroMQ monitor, read by a thread of its own so that a burst is seen at once).
Near the limit the door closes for new connections, keeping a reserve for the daemon's own
sockets and worker restarts: libzmq aborts the whole process when an ipc accept meets
EMFILE. On ipc the door closes by removing the path clients connect to (a hard link to the
socket ZeroMQ bound under a hidden name): connected clients are untouched. On tcp, where
libzmq survives EMFILE, the reserve is kept as open placeholder descriptors that are let
go only to start a worker.
"""

from __future__ import annotations

import errno
import os
import resource
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import structlog
import zmq
from zmq.utils.monitor import recv_monitor_message

from daemon.client import Client, DaemonUnavailable
from daemon.endpoint import (
    LISTENING,
    NOT_A_SOCKET,
    PROBE_TIMEOUT_S,
    STALE,
    EndpointLocked,
    ipc_state,
    lock_file,
    lock_socket_file,
    parse_endpoint,
    unlock_socket_file,
)
from stages import wire

ANSWER_LINGER_MS = 2000      # on exit, the last answers may take this long to leave
# A client message is one msgpack header (no array frames): a peer announcing a bigger frame
# is disconnected by ZeroMQ before it is buffered (by default it would allocate whatever
# size the peer claims and sends).
MAX_CLIENT_FRAME_BYTES = wire.MAX_HEADER_BYTES
RESERVE_FDS = 64             # kept free for the daemon's own sockets, files and restarts
REOPEN_FRACTION = 0.9        # a closed door opens again below this share of the cap
HIDDEN_SUFFIX = ".bound"     # ipc: the name ZeroMQ binds; clients use the hard link


@dataclass
class DoorState:
    connections: int = 0
    refused_bursts: int = 0          # times the door closed
    open: bool = True


class Door:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.log = structlog.get_logger().bind(component="door")
        self.socket: zmq.Socket | None = None
        self.state = DoorState()
        self.removed_stale: Path | None = None
        self._ctx: zmq.Context | None = None
        self._public: Path | None = None        # ipc: the path clients connect to
        self._bound: Path | None = None         # ipc: the name ZeroMQ bound
        self._inode: tuple[int, int] | None = None
        self._lock: tuple[Path, int] | None = None
        self._monitor: threading.Thread | None = None
        self._stop = threading.Event()
        self._placeholders: list[int] = []
        self.cap = 0

    # ---- claim and bind ----------------------------------------------------------------

    def claim(self) -> str | None:
        """Bind the client socket; or say in one line why not (nothing is left behind)."""
        problem = self._claim()
        if problem is not None:
            self.release()
        return problem

    def _claim(self) -> str | None:
        try:
            target = parse_endpoint(self.endpoint)
        except ValueError as exc:
            return str(exc)
        path = target.socket_file
        if path is not None:
            problem = self._check_ipc_path(path)
            if problem is not None:
                return problem
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.ROUTER)   # clients' DEALERs <-> daemon
        sock.setsockopt(zmq.LINGER, ANSWER_LINGER_MS)   # last answers get out
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)        # a gone client's answers drop
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_CLIENT_FRAME_BYTES)
        where = self.endpoint
        if path is not None:
            self._public, self._bound = path, Path(f"{path}{HIDDEN_SUFFIX}")
            where = f"ipc://{self._bound}"
        umask = os.umask(0o077)                   # the ipc socket file is 0600 from birth
        try:
            sock.bind(where)
        except zmq.ZMQError as exc:
            sock.close(0)
            if exc.errno == zmq.EADDRINUSE:
                return _in_use(self.endpoint, None)
            return f"cannot listen at {self.endpoint}: {exc.strerror}"
        finally:
            os.umask(umask)
        self.socket = sock
        if path is not None:
            os.chmod(self._bound, 0o600)
            os.link(self._bound, path)            # the door clients come through
            st = os.stat(path)
            self._inode = (st.st_dev, st.st_ino)
        self._watch_connections()
        return None

    def _check_ipc_path(self, path: Path) -> str | None:
        try:
            self._lock = (path, lock_socket_file(path))
        except EndpointLocked as exc:     # a daemon that answers is named as such
            return _in_use(self.endpoint, path, otherwise=f"{self.endpoint}: {exc}")
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return f"cannot listen at {self.endpoint}: no directory {path.parent}"
            if exc.errno == errno.ELOOP:
                return (f"cannot listen at {self.endpoint}: {lock_file(path)} is a "
                        "symbolic link; not writing through it")
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                return f"cannot listen at {self.endpoint}: {lock_file(path)}: {exc.strerror}"
            # not ours to lock (another user's, a read-only folder): the checks below
            # and the bind say what is there, as they did before the lock existed
        state = ipc_state(path)
        if state == LISTENING:
            return _in_use(self.endpoint, path)
        if state == NOT_A_SOCKET:
            return f"{path} exists and is not a socket: not replacing it"
        if state == STALE:
            try:
                path.unlink(missing_ok=True)
                Path(f"{path}{HIDDEN_SUFFIX}").unlink(missing_ok=True)
            except OSError as exc:
                return f"cannot remove the stale socket file {path}: {exc.strerror}"
            self.removed_stale = path
        return None

    def release(self) -> None:
        """Close the client socket (answers already sent get ANSWER_LINGER_MS to leave) and
        remove our ipc socket file: only ours, should another daemon have taken the path."""
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join(2)
            self._monitor = None
        if self.socket is not None:
            self.socket.disable_monitor()
            self.socket.close()
            self.socket = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self._public is not None and self._inode is not None:
            for name in (self._public, self._bound):
                try:
                    st = os.stat(name)
                    if (st.st_dev, st.st_ino) == self._inode:
                        name.unlink()
                except FileNotFoundError:
                    pass
            self._inode = None
        for fd in self._placeholders:
            os.close(fd)
        self._placeholders.clear()
        if self._lock is not None:          # last: the next serve finds the path free
            unlock_socket_file(*self._lock)
            self._lock = None

    # ---- descriptors ---------------------------------------------------------------------

    def _watch_connections(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            self.log.info("raised the open-files limit", was=soft, now=hard)
            soft = hard
        limit = soft if soft != resource.RLIM_INFINITY else 1 << 20
        self.cap = max(1, limit - _open_fds() - 2 * RESERVE_FDS)
        self._placeholders = [os.open(os.devnull, os.O_RDONLY) for _ in range(RESERVE_FDS)]
        monitor = self.socket.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._monitor = threading.Thread(target=self._count, args=(monitor,),
                                         name="door-monitor", daemon=True)
        self._monitor.start()

    def _count(self, monitor: zmq.Socket) -> None:
        """The monitor thread: counts connections, closes and opens the door. It touches
        no ZeroMQ socket but its own (the ipc door is a hard link: plain filesystem)."""
        try:
            while not self._stop.is_set():
                if not monitor.poll(100):
                    continue
                event = recv_monitor_message(monitor)["event"]
                if event == zmq.EVENT_ACCEPTED:
                    self.state.connections += 1
                elif event == zmq.EVENT_DISCONNECTED:
                    self.state.connections = max(0, self.state.connections - 1)
                self._steer()
        finally:
            monitor.close(0)

    def _steer(self) -> None:
        count = self.state.connections
        if self.state.open and count >= self.cap:
            self.state.open = False
            self.state.refused_bursts += 1
            if self._public is not None:
                self._public.unlink(missing_ok=True)
            self.log.warning("too many client connections: refusing new ones",
                             connections=count, cap=self.cap)
        elif not self.state.open and count < REOPEN_FRACTION * self.cap:
            self.state.open = True
            if self._public is not None:
                try:
                    os.link(self._bound, self._public)
                except FileExistsError:
                    pass
            self.log.info("client connections back under the cap: accepting again",
                          connections=count, cap=self.cap)

    @property
    def monitor_alive(self) -> bool:
        return self._monitor is None or self._monitor.is_alive()

    @contextmanager
    def reserve(self) -> Iterator[None]:
        """Let go of the placeholder descriptors for what needs them (a worker start)."""
        for fd in self._placeholders:
            os.close(fd)
        count = len(self._placeholders)
        self._placeholders = []
        try:
            yield
        finally:
            for _ in range(count):
                try:
                    self._placeholders.append(os.open(os.devnull, os.O_RDONLY))
                except OSError:
                    break


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 64


def _in_use(endpoint: str, path: Path | None, otherwise: str | None = None) -> str:
    """Why the endpoint is taken, naming the daemon there when it answers a status query;
    else `otherwise`, if given."""
    if parse_endpoint(endpoint).host == "*":
        return f"cannot listen at {endpoint}: the port is in use"
    pid = None
    try:
        with Client(endpoint) as client:
            daemon = client.status(timeout_s=PROBE_TIMEOUT_S).get("daemon")
        if isinstance(daemon, dict):
            pid = daemon.get("pid")
    except (DaemonUnavailable, ValueError, zmq.ZMQError, wire.WireError):
        pass                                      # not a daemon of ours, or a silent one
    if pid is not None:
        return f"a daemon (pid {pid}) already answers at {endpoint}"
    if otherwise is not None:
        return otherwise
    where = f"on {path}" if path is not None else "there"
    return (f"{endpoint} is in use: something listens {where} but gave no status within "
            f"{PROBE_TIMEOUT_S:g} s (another program, or a daemon still starting)")
