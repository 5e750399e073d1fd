"""The client endpoint: claimed, bound, counted, released.

Bound before any worker starts, so a taken or malformed endpoint fails in a second. An ipc
socket file that a live daemon answers on is refused (ZeroMQ would silently take the path
and leave that daemon unreachable), one nobody listens on (left by a crash) is replaced,
and `SOCKET.lock` is held from the check until the file is removed at exit, so two serves
started at once cannot both take the path.

Descriptors come from the front's one budget (daemon/fd_budget.py), shared with the /metrics
server and the tcp ports. A thread of its own reads a ZeroMQ monitor of the client socket,
so each accepted connection is seen at once; when the budget has no room left (the
process's open descriptors within RESERVE_FDS of the limit), the door closes for new
connections, and opens again once they are back under it with room to spare: libzmq aborts
the whole process when an ipc accept meets EMFILE. On ipc the door closes by removing the
path clients connect to (a hard link to the socket ZeroMQ bound under a hidden name):
connected clients are untouched. On tcp, where libzmq survives EMFILE, the door cannot
close; the budget's placeholders keep a worker restart possible.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import structlog
import zmq
from zmq.utils.monitor import recv_monitor_message

from pspnet.core import wire
from pspnet.core.keys import (
    CLIENTS,
    KeyAuthenticator,
    Keys,
    KeysError,
    serve_curve,
    start_authenticator,
)
from pspnet.core.trust import Refusals
from pspnet.daemon.client import Client, DaemonUnavailable
from pspnet.daemon.endpoint import (
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
from pspnet.daemon.fd_budget import FdBudget, open_fds

ANSWER_LINGER_MS = 2000      # on exit, the last answers may take this long to leave
MONITOR_JOIN_S = 2.0         # the monitor thread sees the stop within its 100 ms poll
# A client message is one msgpack header (no array frames): a peer announcing a bigger frame
# is disconnected by ZeroMQ before it is buffered (by default it would allocate whatever
# size the peer claims and sends).
MAX_CLIENT_FRAME_BYTES = wire.MAX_HEADER_BYTES
REOPEN_FDS = 32              # a closed door opens again this far under its threshold
BACKLOG = 8                  # connections the kernel queues for the client socket
CLIENT_RCVHWM = 16           # messages read ahead per client connection (libzmq: 1000)
HIDDEN_SUFFIX = ".bound"     # ipc: the name ZeroMQ binds; clients use the hard link
SWITCH_INTERVAL_S = 0.0005


@dataclass
class DoorState:
    connections: int = 0
    closings: int = 0                # times the door closed
    open: bool = True


class Door:
    def __init__(self, endpoint: str, budget: FdBudget | None = None, *,
                 keys_dir: Path | None = None,
                 max_frame_bytes: int = MAX_CLIENT_FRAME_BYTES) -> None:
        """`keys_dir`: a tcp endpoint speaks CurveZMQ with its server key and admits only
        its client key (core.keys); required for tcp. `max_frame_bytes`: the largest frame
        a client may send (a header; an upload: core.uploads.door_frame_limit)."""
        self.max_frame_bytes = max_frame_bytes
        self.endpoint = endpoint
        self.budget = budget or FdBudget()
        self.keys_dir = keys_dir
        self._auth: KeyAuthenticator | None = None
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
        self.cap = 0                            # about as many client connections

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
        if target.scheme == "tcp" and self.keys_dir is None:
            return (f"{self.endpoint}: a tcp endpoint admits only clients with its key: pass "
                    "--keys DIR (`pspnet keys DIR` writes them; clients pass the same "
                    "--keys)")
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.ROUTER)   # clients' DEALERs <-> daemon
        if self.keys_dir is not None and target.scheme == "tcp":
            try:
                keys = Keys.for_daemon(self.keys_dir)
            except (KeysError, OSError) as exc:
                sock.close(0)
                return f"--keys: {exc}"
            serve_curve(sock, keys.server_public, keys.server_secret or b"", CLIENTS)
            self._auth = start_authenticator(self._ctx, Refusals(self.log.warning),
                                             {CLIENTS: keys.client_public or b""})
        sock.setsockopt(zmq.LINGER, ANSWER_LINGER_MS)   # last answers get out
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)        # a gone client's answers drop
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_frame_bytes)
        # what libzmq reads ahead of the daemon on one connection: with uploads a message
        # may be --max-upload-bytes, so a client that ignores `busy` waits on its socket
        # once this many are queued, instead of filling the daemon's memory
        sock.setsockopt(zmq.RCVHWM, CLIENT_RCVHWM)
        sock.setsockopt(zmq.BACKLOG, BACKLOG)          # what can slip in once it closes
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

    def release(self, linger_s: float | None = None) -> None:
        """Close the client socket (answers already sent get `linger_s` to leave, by
        default ANSWER_LINGER_MS) and remove our ipc socket file: only ours, should
        another daemon have taken the path."""
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join(MONITOR_JOIN_S)
            self._monitor = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self.socket is not None:
            self.socket.disable_monitor()
            self.socket.close(ANSWER_LINGER_MS if linger_s is None
                              else max(0, round(linger_s * 1000)))
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
        self.budget.release()
        if self._lock is not None:          # last: the next serve finds the path free
            unlock_socket_file(*self._lock)
            self._lock = None

    # ---- descriptors ---------------------------------------------------------------------

    def _watch_connections(self) -> None:
        self.budget.claim()
        self.cap = max(0, self.budget.room())
        # during a burst of connections this thread must get the GIL within a fraction of
        # a millisecond, not the default 5 ms, or the burst outruns the reserve
        sys.setswitchinterval(SWITCH_INTERVAL_S)
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
                    if not self.state.open:
                        self._steer()          # descriptors freed by something else
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
        if self._public is None:
            return                      # tcp: libzmq refuses at EMFILE and lives on
        fds = open_fds()
        threshold = self.budget.threshold
        if self.state.open and fds >= threshold:
            self._public.unlink(missing_ok=True)
            self.state.open = False
            self.state.closings += 1
            self.log.warning("near the open-files limit: refusing new client connections",
                             connections=self.state.connections, open_fds=fds,
                             threshold=threshold)
        elif not self.state.open and fds < threshold - REOPEN_FDS:
            try:
                os.link(self._bound, self._public)
            except FileExistsError:
                pass
            self.state.open = True
            self.log.info("client connections back under the limit: accepting again",
                          connections=self.state.connections, open_fds=fds)

    @property
    def monitor_alive(self) -> bool:
        return self._monitor is None or self._monitor.is_alive()

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
        return (f"a daemon (pid {pid}) already answers at {endpoint}: stop it (`kill {pid}` "
                "drains it first) or give this one another --endpoint")
    if otherwise is not None:
        return otherwise
    where = f"on {path}" if path is not None else "there"
    return (f"{endpoint} is in use: something listens {where} but gave no status within "
            f"{PROBE_TIMEOUT_S:g} s (another program, or a daemon still starting)")
