"""The daemon's side of its clients: their messages read, checked, accepted or refused,
and their answers sent.

A bounded number of messages per loop turn (the ROUTER queues fairly between clients), so
one noisy client cannot hold the loop. One message, or one request in it, that cannot be
handled costs it an error answer, never the daemon. A request id repeated while pending is
the same request (one answer); reused for another image it is refused with an error reply.
A flood of status queries is answered from one document per loop turn.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import zmq

from pspnet.core import wire
from pspnet.core.files import name_problem
from pspnet.core.logs import json_safe
from pspnet.core.status import ClientCounts, Status, Tally
from pspnet.daemon.front import Front
from pspnet.daemon.serve_config import DEFAULT_MAX_INFLIGHT_BYTES
from pspnet.daemon.upload_budget import BUSY, UploadBudget

READS_PER_TURN = 64          # client messages per loop turn
WARN_EVERY_S = 60.0          # malformed messages: one warning per sender per minute,
WARN_LINES_PER_MIN = 20      # at most this many per minute over all senders,
WARN_SENDERS_KEPT = 4096     # and a bounded memory of senders
REPEAT_ELSEWHERE = "repeat elsewhere"   # a pending id reused for another image


class Clients:
    def __init__(self, socket: zmq.Socket, front: Front, max_queue: int,
                 allow_roots: tuple[Path, ...], status: Callable[[], Status],
                 uploads: UploadBudget | None = None) -> None:
        self.socket = socket                  # the door's ROUTER: clients' DEALERs
        self.front = front
        self.max_queue = max_queue
        self.allow_roots = allow_roots
        self.status = status
        self.uploads = uploads or UploadBudget(DEFAULT_MAX_INFLIGHT_BYTES,
                                               front.cfg.max_upload_bytes)
        self.stopping = False                 # set by the server: intake closed
        self.log = structlog.get_logger().bind(component="supervisor")
        self.counts = Tally(ClientCounts)
        self._warned: dict[bytes, float] = {}   # sender -> last warning (monotonic)
        self._warn_lines: list[float] = []      # every warning line in the last minute
        self._warn_suppressed = 0
        self._status: list[Any] | None = None   # encoded status reply, until anything moves

    def new_turn(self) -> None:
        """Anything may have moved since the last status reply was built."""
        self._status = None

    def read(self) -> None:
        for _ in range(READS_PER_TURN):
            try:
                identity, *frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.counts["bytes_in"] += len(identity) + sum(len(f) for f in frames)
            client = identity.bytes
            try:
                self._message(client, frames)
            except Exception as exc:        # one message costs an error answer, not the daemon
                self._status = None
                self.counts["client_errors"] += 1
                self.log.exception("client message not handled", client=client.hex())
                self.send(client, wire.Reply("error", message=f"internal error: {exc}"))

    def send(self, client: bytes, msg: wire.Message) -> None:
        if self.uploads.held and isinstance(msg, wire.Result | wire.Results):
            ids = [msg.id] if isinstance(msg, wire.Result) else \
                [r.id for r in msg.results] + (msg.ok.ids if msg.ok is not None else [])
            for rid in ids:
                self.uploads.release(client, rid)            # answered: bytes free
        self._send_frames(client, wire.encode(msg))

    def send_replies(self, replies: list[tuple[Any, wire.Reply]]) -> None:
        """Replies to clients (a reload's outcome); others (SIGHUP's) are not a client's."""
        for origin, reply in replies:
            if isinstance(origin, bytes):
                self.send(origin, reply)

    # ---- inside ------------------------------------------------------------------------

    def _message(self, client: bytes, frames: list[zmq.Frame]) -> None:
        try:
            msg = wire.decode(frames, max_submit=1024)
        except wire.WireError as exc:
            self._status = None
            self.counts["malformed"] += 1
            self._rate_limited_warning(client, str(exc))
            ids = (exc.request_id,) if exc.request_id else ()
            self.send(client, wire.Reply("error", ids, f"malformed message: {exc}"))
            return
        if isinstance(msg, wire.StatusQuery):
            self._send_frames(client, self._status_frames())
            return
        self._status = None                          # a reply after this one sees it
        if isinstance(msg, wire.Submit):
            self._accept(client, msg.requests)
        elif isinstance(msg, wire.Reload):
            self._reload(client, msg)
        elif isinstance(msg, wire.Cancel):
            dropped = self.front.ledger.cancel(client, msg.ids)
            self.counts["cancelled"] += len(dropped)
            for entry in dropped:
                self.uploads.release(client, entry.client_id)
            self.send(client, wire.Reply("cancelled", tuple(e.client_id for e in dropped)))
        else:
            self.send(client, wire.Reply("error", message=f"unexpected {type(msg).__name__}"))

    def _accept(self, client: bytes, requests: tuple[wire.Request, ...]) -> None:
        ids = tuple(r.id for r in requests)
        if self.stopping:
            self.send(client, wire.Reply("error", ids, "daemon is shutting down"))
            return
        room = max(0, self.max_queue - self.front.pending)
        if len(requests) > room:
            # Take what fits, in order, and say `busy` for the rest: all-or-nothing would
            # starve a client sending big chunks behind one that sends small ones.
            self.counts["busy_replies"] += 1
            self.send(client, wire.Reply("busy", ids[room:], "queue full, retry later"))
            requests = requests[:room]
            if not requests:
                return
        accepted: list[str] = []
        busy: list[str] = []
        for r in requests:
            try:
                problem = self._admit(client, r)
                if problem == BUSY:                 # its bytes do not fit now: later
                    busy.append(r.id)
                    continue
            except Exception as exc:        # e.g. a path the checks choke on
                self.log.exception("request not handled", id=r.id)
                problem = f"internal error: {type(exc).__name__}: {exc}"
            if problem is None:
                accepted.append(r.id)
            elif problem == REPEAT_ELSEWHERE:
                self.send(client, wire.Reply(
                    "error", (r.id,), f"request id {r.id} is already in use for another "
                                      "image; its first request stays"))
            else:
                self.counts["refused"] += 1
                self.send(client, wire.Result(r.id, 0, wire.ERROR, r.path, error=problem,
                                              stage="front"))
        if busy:
            self.counts["upload_busy"] += len(busy)
            self.send(client, wire.Reply("busy", tuple(busy), "uploads in flight at "
                                         "--max-upload-inflight, retry later"))
        if accepted:
            self.send(client, wire.Reply("accepted", tuple(accepted)))

    def _reload(self, client: bytes, msg: wire.Reload) -> None:
        """A live reload (daemon.reload): refused at once with the reason, or started and
        answered when it switched or failed. A model directory a client names is held to
        --allow-root like any path it names."""
        reloader = self.front.reloader           # counts its refusals apart from images
        problem = "the daemon is shutting down" if self.stopping else None
        if problem is None and msg.model:
            problem = refusal(wire.Request("reload", msg.model), self.allow_roots)
        if problem is not None:
            problem = reloader.refuse(problem)
        else:
            problem = reloader.request(msg.model or None, msg.force, client)
        if problem is not None:
            self.send(client, wire.Reply("error", message=problem))

    def _admit(self, client: bytes, r: wire.Request) -> str | None:
        """None: accepted (a repeat of a pending id for the same image is the same
        request: one answer); else why not."""
        pending = self.front.ledger.find(client, r.id)
        if pending is not None:
            same = (pending.request.path, pending.request.ann) == (r.path, r.ann)
            return None if same else REPEAT_ELSEWHERE
        if r.data is not None:                      # an upload: its bytes, not a path
            problem = upload_problem(r) or self.uploads.admit(client, r.id, r.data.nbytes)
            if problem is None:
                self.counts["uploads"] += 1
                self.front.submit(r, origin=client)
            return problem
        problem = refusal(r, self.allow_roots)
        if problem is None:
            self.front.submit(wire.Request(r.id, r.path, r.ann, want=r.want, write=r.write),
                              origin=client)
        return problem

    def _status_frames(self) -> list[Any]:
        """Built again only once anything has moved (a new turn, another message)."""
        if self._status is None:
            body = json_safe(self.status().document())
            self._status = wire.encode(wire.Reply("status", body=body))
        return self._status

    def _send_frames(self, client: bytes, frames: list[Any]) -> None:
        try:
            self.socket.send_multipart([client, *frames], zmq.NOBLOCK)
        except zmq.ZMQError:
            return                              # client gone or stuck: never block the loop
        self.counts["bytes_out"] += len(client) + sum(len(f) for f in frames)

    def _rate_limited_warning(self, client: bytes, error: str) -> None:
        """One line per sender per minute, at most WARN_LINES_PER_MIN lines a minute in all
        (a flood from fresh connections, each a new sender, cannot flood the log)."""
        now = time.monotonic()
        if now - self._warned.get(client, -1e9) <= WARN_EVERY_S:
            return
        self._warn_lines = [t for t in self._warn_lines if now - t <= 60.0]
        if len(self._warn_lines) >= WARN_LINES_PER_MIN:
            self._warn_suppressed += 1
            return
        if len(self._warned) >= WARN_SENDERS_KEPT:
            self._warned = {c: t for c, t in self._warned.items() if now - t <= WARN_EVERY_S}
            if len(self._warned) >= WARN_SENDERS_KEPT:
                self._warned.clear()
        self._warned[client] = now
        self._warn_lines.append(now)
        self.log.warning("malformed client message", client=client.hex(), error=error,
                         suppressed=self._warn_suppressed)
        self._warn_suppressed = 0


def upload_problem(r: wire.Request) -> str | None:
    """Why an upload is refused before its bytes are looked at; None: it is not. Its path
    only names it (the mask's name); ground truths are read by path, on the daemon's
    host."""
    if r.ann is not None:
        return "a ground truth is read by path on the daemon's host: not with an upload"
    return None


def refusal(r: wire.Request, allow_roots: tuple[Path, ...]) -> str | None:
    """Why a request is refused at the door, before any file is opened; None: it is not."""
    for p in (r.path, r.ann):
        problem = name_problem(p) if p is not None else None
        if problem is not None:             # (watch mode's names: the door's are UTF-8)
            return problem
    if not os.path.isabs(r.path) or (r.ann is not None and not os.path.isabs(r.ann)):
        return "paths must be absolute"
    for p in (r.path, r.ann) if allow_roots else ():
        if p is None:
            continue
        resolved = _resolve(p)
        if resolved is None:
            return f"symbolic link loop: {p}"
        if not any(resolved.is_relative_to(root) for root in _roots(allow_roots)):
            return f"path outside the allowed input roots: {p}"
    return None


def _resolve(path: str) -> Path | None:
    """The path with every link followed; None for a link loop (os.path.realpath would
    stop there quietly, Path.resolve raise)."""
    try:
        return Path(os.path.realpath(path, strict=True))
    except FileNotFoundError:
        return Path(os.path.realpath(path))       # missing: preprocess says so
    except OSError:
        return None                               # ELOOP, or another failure to resolve


def _roots(allow_roots: tuple[Path, ...]) -> list[Path]:
    return [Path(os.path.realpath(root)) for root in allow_roots]
