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

from stages import wire

CHUNK = 64                   # requests per submit message
BUSY_BACKOFF_S = 0.2         # wait this long before resending what the daemon called busy
STATUS_TIMEOUT_S = 5.0


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
        self.endpoint = endpoint
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

    def status(self, timeout_s: float = STATUS_TIMEOUT_S) -> dict[str, Any]:
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
        prefix = uuid.uuid4().hex[:12]
        requests = [wire.Request(f"{prefix}-{i}", str(Path(p).absolute()),
                                 None if not anns or anns[i] is None
                                 else str(Path(anns[i]).absolute()))
                    for i, p in enumerate(paths)]
        by_id = {r.id: r for r in requests}
        to_send = collections.deque(requests)
        sent_at: dict[str, float] = {}
        unacked: set[str] = set()
        open_ids = set(by_id)
        start = time.monotonic()
        heard = False
        resend_after = 0.0
        while open_ids:
            now = time.monotonic()
            if timeout_s is not None and now - start > timeout_s:
                for rid in sorted(open_ids, key=lambda r: int(r.rsplit("-", 1)[1])):
                    yield Answer(rid, by_id[rid].path, wire.ERROR, None,
                                 f"timed out after {timeout_s} s", (now - start) * 1e3)
                return
            if not heard and now - start > connect_timeout_s:
                raise DaemonUnavailable(f"no daemon answered at {self.endpoint}")
            if to_send and not unacked and now >= resend_after:
                chunk = [to_send.popleft() for _ in range(min(CHUNK, len(to_send)))]
                self.socket.send_multipart(wire.encode(wire.Submit(tuple(chunk))))
                for r in chunk:
                    sent_at.setdefault(r.id, now)
                    unacked.add(r.id)
            if not self.socket.poll(100):
                continue
            heard = True
            msg = wire.decode(self.socket.recv_multipart())
            if isinstance(msg, wire.Reply):
                unacked.difference_update(msg.ids)
                if msg.status == "busy":           # back off, then resend these
                    to_send.extendleft(reversed([by_id[i] for i in msg.ids if i in by_id]))
                    resend_after = time.monotonic() + BUSY_BACKOFF_S
                elif msg.status == "error":
                    for rid in msg.ids:
                        if rid in open_ids:
                            open_ids.discard(rid)
                            yield Answer(rid, by_id[rid].path, wire.ERROR, None, msg.message,
                                         (time.monotonic() - sent_at[rid]) * 1e3)
            elif isinstance(msg, wire.Result) and msg.id in open_ids:
                open_ids.discard(msg.id)
                unacked.discard(msg.id)
                yield Answer(msg.id, by_id[msg.id].path, msg.status, msg.mask, msg.error,
                             (time.monotonic() - sent_at.get(msg.id, start)) * 1e3)
