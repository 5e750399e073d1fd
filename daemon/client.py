"""The client: send image paths to a running daemon, get one answer per image.

Usable from Python (`Client(endpoint).submit(paths)`) and behind `pspnet submit`.
"""

from __future__ import annotations

import collections
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from daemon.endpoint import ABSENT, NOT_A_SOCKET, STALE, ipc_state, parse_endpoint
from stages import wire

CHUNK = 64                   # requests per submit message
CHUNK_BYTES = wire.MAX_HEADER_BYTES - 4096   # and at most this much header (long paths)
BUSY_BACKOFF_S = 0.2         # wait this long before resending what the daemon called busy
STATUS_TIMEOUT_S = 5.0
SILENCE_S = 5.0              # nothing heard this long with requests open: ask for status
PING_TIMEOUT_S = 10.0        # no status reply this long after asking: the daemon is gone


class DaemonUnavailable(RuntimeError):
    """No daemon answered at the endpoint."""


@dataclass(frozen=True)
class Answer:
    id: str
    path: str
    status: str
    mask: str | None
    error: str | None
    latency_ms: float

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "path": self.path, "status": self.status, "mask": self.mask,
                "error": self.error, "latency_ms": round(self.latency_ms, 2)}


class Client:
    def __init__(self, endpoint: str) -> None:
        self.target = parse_endpoint(endpoint)      # ValueError before any socket exists
        self.endpoint = endpoint
        self.resubmitted = 0     # requests sent again because the daemon restarted
        self.ctx = zmq.Context()
        self.socket = self.ctx.socket(zmq.DEALER)    # submits and queries -> daemon ROUTER
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)

    def close(self) -> None:
        self.socket.close(0)
        self.ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_socket_file(self) -> None:
        """An ipc socket file that is missing, or that nobody listens on, means no daemon:
        say so at once instead of after the reply timeout."""
        path = self.target.socket_file
        if path is None:
            return
        why = {ABSENT: f"{path} does not exist",
               STALE: f"nothing listens on {path} (a stale socket file)",
               NOT_A_SOCKET: f"{path} is not a socket"}.get(ipc_state(path))
        if why is not None:
            raise DaemonUnavailable(f"no daemon at {self.endpoint}: {why}")

    def status(self, timeout_s: float = STATUS_TIMEOUT_S) -> dict[str, Any]:
        self._check_socket_file()
        self.socket.send_multipart(wire.encode(wire.StatusQuery()))
        deadline = time.monotonic() + timeout_s
        while self.socket.poll(max(0, deadline - time.monotonic()) * 1e3):
            msg = wire.decode(self.socket.recv_multipart())
            if isinstance(msg, wire.Reply) and msg.status == "status":
                return msg.body
        raise DaemonUnavailable(f"no daemon answered at {self.endpoint} within {timeout_s} s")

    def submit(self, paths: Sequence[str | Path], anns: Sequence[str | None] | None = None,
               timeout_s: float | None = None, connect_timeout_s: float = 10.0,
               ) -> Iterator[Answer]:
        """Yield one Answer per path, as they finish. Busy replies slow us down, never drop."""
        self._check_socket_file()
        prefix = uuid.uuid4().hex[:12]
        requests = [wire.Request(f"{prefix}-{i}", str(Path(p).absolute()),
                                 None if not anns or anns[i] is None
                                 else str(Path(anns[i]).absolute()))
                    for i, p in enumerate(paths)]
        by_id = {r.id: r for r in requests}
        open_ids = set(by_id)
        start = time.monotonic()
        order = {r.id: i for i, r in enumerate(requests)}
        for r in requests:                       # the daemon would refuse the whole chunk
            problem = _unsendable(r)
            if problem is not None:
                open_ids.discard(r.id)
                yield Answer(r.id, r.path, wire.ERROR, None, problem, 0.0)
        to_send = collections.deque(r for r in requests if r.id in open_ids)
        sent_at: dict[str, float] = {}
        unacked: set[str] = set()
        heard = False
        resend_after = 0.0
        # Liveness: who answers (its pid), when we last heard, whether a ping is out. A
        # daemon that died leaves our requests open forever; one that restarted (another
        # pid) lost the ones it had accepted, so they are sent again.
        self.socket.send_multipart(wire.encode(wire.StatusQuery()))
        daemon_pid, last_heard, ping_at = None, start, None
        while open_ids:
            now = time.monotonic()
            if timeout_s is not None and now - start > timeout_s:
                for rid in sorted(open_ids, key=order.__getitem__):
                    yield Answer(rid, by_id[rid].path, wire.ERROR, None,
                                 f"timed out after {timeout_s} s", (now - start) * 1e3)
                return
            if not heard and now - start > connect_timeout_s:
                raise DaemonUnavailable(f"no daemon answered at {self.endpoint}")
            if heard and ping_at is None and now - last_heard > SILENCE_S:
                self.socket.send_multipart(wire.encode(wire.StatusQuery()))
                ping_at = now
            if ping_at is not None and now - ping_at > PING_TIMEOUT_S:
                for rid in sorted(open_ids, key=order.__getitem__):
                    yield Answer(rid, by_id[rid].path, wire.ERROR, None,
                                 f"the daemon stopped answering (no reply for "
                                 f"{now - last_heard:.0f} s): not processed, or its result "
                                 "was lost", (now - sent_at.get(rid, start)) * 1e3)
                return
            if to_send and not unacked and now >= resend_after:
                chunk = [to_send.popleft()]
                size = _wire_size(chunk[0])
                while to_send and len(chunk) < CHUNK and \
                        size + _wire_size(to_send[0]) <= CHUNK_BYTES:
                    size += _wire_size(to_send[0])
                    chunk.append(to_send.popleft())
                self.socket.send_multipart(wire.encode(wire.Submit(tuple(chunk))))
                for r in chunk:
                    sent_at.setdefault(r.id, now)
                    unacked.add(r.id)
            if not self.socket.poll(100):
                continue
            heard = True
            last_heard, ping_at = time.monotonic(), None
            msg = wire.decode(self.socket.recv_multipart())
            if isinstance(msg, wire.Reply) and msg.status == "status":
                pid = (msg.body.get("daemon") or {}).get("pid")
                if daemon_pid is not None and pid != daemon_pid:
                    queued = {r.id for r in to_send}
                    again = [r for r in requests if r.id in open_ids and r.id not in queued]
                    self.resubmitted += len(again)
                    to_send = collections.deque(sorted([*again, *to_send],
                                                       key=lambda r: order[r.id]))
                    unacked.clear()
                daemon_pid = pid
            elif isinstance(msg, wire.Reply):
                unacked.difference_update(msg.ids)
                if msg.status == "busy":           # back off, then resend these
                    to_send.extendleft(reversed([by_id[i] for i in msg.ids if i in by_id]))
                    resend_after = time.monotonic() + BUSY_BACKOFF_S
                elif msg.status == "error":
                    # without ids (a malformed submit) it is about the chunk in flight
                    for rid in msg.ids or tuple(unacked):
                        unacked.discard(rid)
                        if rid in open_ids:
                            open_ids.discard(rid)
                            yield Answer(rid, by_id[rid].path, wire.ERROR, None, msg.message,
                                         (time.monotonic() - sent_at[rid]) * 1e3)
            elif isinstance(msg, wire.Result) and msg.id in open_ids:
                open_ids.discard(msg.id)
                unacked.discard(msg.id)
                yield Answer(msg.id, by_id[msg.id].path, msg.status, msg.mask, msg.error,
                             (time.monotonic() - sent_at.get(msg.id, start)) * 1e3)


def _wire_size(r: wire.Request) -> int:
    """About the bytes one request adds to a submit header (msgpack, with its field names)."""
    return (len(r.id.encode()) + len(r.path.encode())
            + len((r.ann or "").encode()) + 48)


def _unsendable(r: wire.Request) -> str | None:
    for what, value in (("path", r.path), ("ground-truth path", r.ann)):
        if value is not None and len(value) > wire.MAX_STRING_CHARS:
            return f"{what} longer than {wire.MAX_STRING_CHARS} characters"
        if value is not None and "\x00" in value:
            return f"{what} contains a NUL byte"
    return None
