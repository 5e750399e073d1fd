"""The client: send image paths to a running daemon, get one answer per image.

Usable from Python (`Client(endpoint).submit(paths)`) and behind `pspnet submit`. With
`upload` (or `Client.upload` for bytes in memory) it sends the encoded images instead of
their paths and gets each mask back in its answer (daemon/uploads_client.py).
"""

from __future__ import annotations

import collections
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from pspnet.core import wire
from pspnet.core.files import name_problem
from pspnet.core.keys import ENV_KEYS, ClientHandshakes, KeysError, client_keys, connect_curve
from pspnet.daemon.endpoint import (
    ABSENT,
    NOT_A_SOCKET,
    STALE,
    ipc_state,
    parse_endpoint,
    where_daemons_are,
)
from pspnet.daemon.uploads_client import Upload, UploadSide, returned_answer

CHUNK = 64                   # requests per submit message
CHUNK_BYTES = wire.MAX_HEADER_BYTES - 4096   # and at most this much header (long paths)
BUSY_BACKOFF_S = 0.2         # wait this long before resending what the daemon called busy
STATUS_TIMEOUT_S = 5.0
SILENCE_S = 5.0              # nothing heard this long with requests open: ask for status
PING_TIMEOUT_S = 10.0        # no status reply this long after asking: the daemon is gone
CANCEL_WAIT_S = 5.0          # after a cancel, wait this long for the requests already running
CANCEL_CHUNK = 1024          # ids per cancel message (the daemon reads at most 1024 a list)
CANCELLED = "cancelled"      # an Answer's status: dropped before it started, never run
RELOAD_TIMEOUT_S = 300.0     # a reload's answer: a new model's load and first batch
SEND_TIMEOUT_MS = 5000       # a send that cannot leave (no peer: a refused handshake)


class DaemonUnavailable(RuntimeError):
    """No daemon answered at the endpoint."""


class KeyRefused(DaemonUnavailable):
    """A daemon is there, but it refused this client's keys at the handshake."""


def unavailable_text(exc: DaemonUnavailable, endpoint: str) -> str:
    """The error, and where this user's daemons run: not for a refused key (that daemon is
    there; the error names the fix)."""
    return f"{exc}" if isinstance(exc, KeyRefused) else f"{exc}{where_daemons_are(endpoint)}"


class ReloadFailed(RuntimeError):
    """The daemon refused a reload, or the new model failed; the message says why."""


@dataclass(frozen=True)
class Answer:
    id: str
    path: str
    status: str
    mask: str | None
    error: str | None
    latency_ms: float
    size: tuple[int, int] | None = None           # height, width
    found: tuple[tuple[int, str, int], ...] = ()  # (class id, name, pixels), largest first
    model: str = ""                               # the version of the model that made it
    png: bytes | None = None                      # an upload's mask, as the daemon writes it
    labels: Any = None                            # or its uint8 H x W label map (numpy)

    def shares(self) -> list[tuple[int, str, float]]:
        """(class id, name, share of the image in 0..1) of each class found, largest first."""
        if self.size is None:
            return []
        area = self.size[0] * self.size[1]
        return [(k, name, pixels / area) for k, name, pixels in self.found]

    def as_dict(self) -> dict[str, Any]:
        doc = {"id": self.id, "path": self.path, "status": self.status, "mask": self.mask,
               "error": self.error, "latency_ms": round(self.latency_ms, 2)}
        if self.model:
            doc["model"] = self.model
        if self.size is not None:
            doc |= {"height": self.size[0], "width": self.size[1],
                    "classes": [{"id": k, "name": name, "share": round(share, 5)}
                                for k, name, share in self.shares()]}
        return doc


class Client:
    def __init__(self, endpoint: str, keys_dir: Path | None = None) -> None:
        """`keys_dir` (default $PSPNET_KEYS): a tcp endpoint's client.key_secret and
        server.key (core.keys); ValueError, before any socket, when a tcp endpoint has none."""
        self.target = parse_endpoint(endpoint)      # ValueError before any socket exists
        self.endpoint = endpoint
        self.resubmitted = 0     # requests sent again because the daemon restarted
        curve = None
        if self.target.scheme == "tcp":
            folder = keys_dir or (Path(os.environ[ENV_KEYS]) if os.environ.get(ENV_KEYS)
                                  else None)
            if folder is None:
                raise ValueError(f"{endpoint}: every tcp endpoint of pspnet admits only "
                                 f"clients with its keys: pass --keys DIR or set {ENV_KEYS} "
                                 "(client.key_secret and server.key from the daemon's "
                                 "`pspnet keys DIR`)")
            try:
                curve = client_keys(folder)
            except KeysError as exc:
                raise ValueError(str(exc)) from None
        self.ctx = zmq.Context()
        self.socket = self.ctx.socket(zmq.DEALER)    # submits and queries -> daemon ROUTER
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)    # refused: no peer to block on
        self.handshakes: ClientHandshakes | None = None
        if curve is not None:
            connect_curve(self.socket, *curve)
            self.handshakes = ClientHandshakes(self.socket)
        self.socket.connect(endpoint)

    def close(self) -> None:
        if self.handshakes is not None:
            self.handshakes.close()
        self.socket.close(0)
        self.ctx.term()

    def _unavailable(self, text: str) -> DaemonUnavailable:
        """'No answer', or the handshake's refusal with the fix when that is why."""
        why = self.handshakes.refused() if self.handshakes is not None else None
        if why is None:
            return DaemonUnavailable(text)
        return KeyRefused(f"{why} at {self.endpoint}: pass --keys DIR (or set {ENV_KEYS}) "
                          "with client.key_secret and server.key copied from the daemon's "
                          "keys folder (`pspnet keys DIR` on its host)")

    def _send(self, msg: wire.Message) -> None:
        try:
            self.socket.send_multipart(wire.encode(msg))
        except zmq.Again:               # SEND_TIMEOUT_MS and no peer took it
            raise self._unavailable(f"could not send to {self.endpoint}") from None

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
        deadline = time.monotonic() + timeout_s
        self._send(wire.StatusQuery())
        while self.socket.poll(max(0, deadline - time.monotonic()) * 1e3):
            msg = wire.decode(self.socket.recv_multipart())
            if isinstance(msg, wire.Reply) and msg.status == "status":
                return msg.body
        raise self._unavailable(f"no daemon answered at {self.endpoint} within {timeout_s} s")

    def reload(self, model: str | Path | None = None, force: bool = False,
               timeout_s: float = RELOAD_TIMEOUT_S) -> dict[str, Any]:
        """Ask the daemon to serve `model` (a directory on its host; None: the one it
        serves, read again) from now on, live: returns once new requests go to it (the
        reply's body: version, previous, load_s); ReloadFailed with the daemon's reason
        when it refused or the new model failed (the old one serves on)."""
        self._check_socket_file()
        where = "" if model is None else str(Path(model).absolute())
        self._send(wire.Reload(where, force))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.socket.poll(min(1.0, max(0.0, deadline - time.monotonic())) * 1e3):
                self._check_socket_file()           # the daemon went away meanwhile
                continue
            msg = wire.decode(self.socket.recv_multipart())
            if isinstance(msg, wire.Reply) and msg.status == "reloaded":
                return msg.body
            if isinstance(msg, wire.Reply) and msg.status == "error":
                raise ReloadFailed(msg.message)
        raise self._unavailable(f"no answer to the reload from {self.endpoint} within "
                                f"{timeout_s:g} s (the daemon may still switch to the model)")

    def upload(self, images: Sequence[tuple[str | Path, bytes]], options: Upload | None = None,
               timeout_s: float | None = None, connect_timeout_s: float = 10.0,
               interrupts: Callable[[], int] | None = None) -> Iterator[Answer]:
        """`submit` for encoded images in memory, each (the name its mask takes: its path,
        bytes): their masks come back in the answers (`options`: what, and where to write
        them)."""
        side = UploadSide(options or Upload(), {str(Path(name).absolute()): data
                                                for name, data in images})
        return self.submit([name for name, _ in images], timeout_s=timeout_s,
                           connect_timeout_s=connect_timeout_s, interrupts=interrupts,
                           upload=side)

    def submit(self, paths: Sequence[str | Path], anns: Sequence[str | None] | None = None,
               timeout_s: float | None = None, connect_timeout_s: float = 10.0,
               interrupts: Callable[[], int] | None = None,
               upload: Upload | UploadSide | None = None) -> Iterator[Answer]:
        """Yield one Answer per path, as they finish. Busy replies slow us down, never drop.

        `interrupts` (how many times the user asked to stop, e.g. Ctrl-C): at the first, the
        requests not yet started are cancelled (those never sent here, the queued ones by
        the daemon: answers with status CANCELLED) and those running get CANCEL_WAIT_S to
        finish; at the second, or after that wait, the rest are answered as errors.

        `upload`: send each file's bytes (read as it is sent), not its path: for a daemon
        that cannot read this host's files; the masks come back in the answers."""
        self._check_socket_file()
        prefix = uuid.uuid4().hex[:12]
        requests = [wire.Request(f"{prefix}-{i}", str(Path(p).absolute()),
                                 None if not anns or anns[i] is None
                                 else str(Path(anns[i]).absolute()))
                    for i, p in enumerate(paths)]
        if upload is not None:
            side = upload if isinstance(upload, UploadSide) else UploadSide(upload)
            requests = side.requests(requests)
        run = _Submission(self.socket, requests, None if upload is None else side)
        yield from run.refuse_unsendable()      # the daemon would refuse the whole chunk
        try:
            self.socket.send_multipart(wire.encode(wire.StatusQuery()))   # who answers: its pid
            while run.open_ids:
                now = time.monotonic()
                asked = interrupts() if interrupts is not None else 0
                if asked and run.cancel_at is None:
                    yield from run.cancel(now)
                if run.cancel_at is not None and (asked > 1 or now - run.cancel_at > CANCEL_WAIT_S):
                    yield from run.fail_open("interrupted while running: not waited for (its mask "
                                             "may still be written)", now, None)
                    return
                if timeout_s is not None and now - run.start > timeout_s:
                    yield from run.fail_open(f"timed out after {timeout_s} s", now, run.start)
                    return
                if not run.heard and now - run.start > connect_timeout_s:
                    raise self._unavailable(f"no daemon answered at {self.endpoint}")
                if run.daemon_gone(now):
                    yield from run.fail_open(
                        f"the daemon stopped answering (no reply for {now - run.last_heard:.0f} "
                        "s): not processed, or its result was lost", now, None)
                    return
                run.send_next_chunk(now)
                yield from run.take_local()
                if self.socket.poll(100):
                    yield from run.handle(wire.decode(self.socket.recv_multipart()))
        except zmq.Again:    # nothing can leave: no daemon took the connection
            raise self._unavailable(f"could not send to {self.endpoint} for "
                                    f"{SEND_TIMEOUT_MS / 1000:g} s") from None
        self.resubmitted += run.resubmitted


class _Submission:
    """One `submit` call's state: what is open, sent, acknowledged, and who answers.

    Liveness: a daemon that died leaves requests open forever, so after SILENCE_S without
    a word a status query goes out, and no reply within PING_TIMEOUT_S ends the wait; a
    reply from another pid (a restarted daemon, which lost what it had accepted) sends
    every open request again."""

    def __init__(self, socket: zmq.Socket, requests: list[wire.Request],
                 upload: UploadSide | None = None) -> None:
        self.socket = socket
        self.upload = upload
        self.local: list[Answer] = []         # answered here (an upload unreadable, too big)
        self.by_id = {r.id: r for r in requests}
        self.order = {r.id: i for i, r in enumerate(requests)}
        self.open_ids = set(self.by_id)
        self.to_send = collections.deque(requests)
        self.sent_at: dict[str, float] = {}
        self.unacked: set[str] = set()        # sent, no accepted/busy/error reply yet
        self.resend_after = 0.0
        self.start = self.last_heard = time.monotonic()
        self.heard = False
        self.ping_at: float | None = None
        self.daemon_pid: int | None = None
        self.resubmitted = 0
        self.cancel_at: float | None = None   # when the user asked to stop

    def refuse_unsendable(self) -> Iterator[Answer]:
        for r in list(self.to_send):
            problem = _unsendable(r)
            if problem is not None:
                self.open_ids.discard(r.id)
                self.to_send.remove(r)
                yield Answer(r.id, r.path, wire.ERROR, None, problem, 0.0)

    def fail_open(self, error: str, now: float, since: float | None) -> Iterator[Answer]:
        """Every open request answered with `error`; latency from `since`, else from when
        each was sent."""
        for rid in sorted(self.open_ids, key=self.order.__getitem__):
            began = since if since is not None else self.sent_at.get(rid, self.start)
            yield Answer(rid, self.by_id[rid].path, wire.ERROR, None, error,
                         (now - began) * 1e3)
        self.open_ids.clear()

    def cancel(self, now: float) -> Iterator[Answer]:
        """Stop sending; what was never sent is cancelled here, what was sent is asked of
        the daemon (it drops what is still queued and says which)."""
        self.cancel_at = now
        for r in self.to_send:
            self.open_ids.discard(r.id)
            yield Answer(r.id, r.path, CANCELLED, None, None, 0.0)
        self.to_send.clear()
        sent = sorted(self.open_ids, key=self.order.__getitem__)
        for i in range(0, len(sent), CANCEL_CHUNK):
            self.socket.send_multipart(wire.encode(wire.Cancel(tuple(sent[i:i + CANCEL_CHUNK]))))

    def daemon_gone(self, now: float) -> bool:
        if self.heard and self.ping_at is None and now - self.last_heard > SILENCE_S:
            self.socket.send_multipart(wire.encode(wire.StatusQuery()))
            self.ping_at = now
        return self.ping_at is not None and now - self.ping_at > PING_TIMEOUT_S

    def send_next_chunk(self, now: float) -> None:
        """One chunk at a time (up to CHUNK requests, CHUNK_BYTES of header), once the
        previous one was acknowledged and any busy back-off has passed."""
        if not self.to_send or self.unacked or now < self.resend_after or self.cancel_at:
            return
        if self.upload is not None:
            chunk = self.upload.chunk(self.to_send, self._answer_here)
            if chunk is None:                 # the daemon's upload limit not known yet
                return
            if chunk:
                self.socket.send_multipart(wire.encode(wire.Submit(tuple(chunk))),
                                           copy=False)
            for r in chunk:
                self.sent_at.setdefault(r.id, now)
                self.unacked.add(r.id)
            return
        chunk = [self.to_send.popleft()]
        size = _wire_size(chunk[0])
        while self.to_send and len(chunk) < CHUNK and \
                size + _wire_size(self.to_send[0]) <= CHUNK_BYTES:
            size += _wire_size(self.to_send[0])
            chunk.append(self.to_send.popleft())
        self.socket.send_multipart(wire.encode(wire.Submit(tuple(chunk))))
        for r in chunk:
            self.sent_at.setdefault(r.id, now)
            self.unacked.add(r.id)

    def _answer_here(self, r: wire.Request, error: str) -> None:
        self.open_ids.discard(r.id)
        self.local.append(Answer(r.id, r.path, wire.ERROR, None, error, 0.0))

    def take_local(self) -> Iterator[Answer]:
        local, self.local = self.local, []
        yield from local

    def handle(self, msg: wire.Message) -> Iterator[Answer]:
        self.heard, self.last_heard, self.ping_at = True, time.monotonic(), None
        if isinstance(msg, wire.Reply) and msg.status == "status":
            self._status(msg.body)
        elif isinstance(msg, wire.Reply):
            yield from self._reply(msg)
        elif isinstance(msg, wire.Results):
            for result in msg.each():         # columns back to Results, here
                yield from self.handle(result)
        elif isinstance(msg, wire.Result) and msg.id in self.open_ids:
            self.open_ids.discard(msg.id)
            self.unacked.discard(msg.id)
            answer = Answer(msg.id, self.by_id[msg.id].path, msg.status, msg.mask,
                            msg.error,
                            (time.monotonic() - self.sent_at.get(msg.id, self.start)) * 1e3,
                            msg.size, msg.found, msg.model)
            if self.upload is not None:
                answer = returned_answer(answer, msg, self.upload.options)
            yield answer

    def _status(self, body: dict[str, Any]) -> None:
        daemon = body.get("daemon")         # (whatever answers here may be another program)
        pid = daemon.get("pid") if isinstance(daemon, dict) else None
        if self.upload is not None:
            self.upload.heard(body)
        if self.daemon_pid is not None and pid != self.daemon_pid and self.cancel_at is None:
            queued = {r.id for r in self.to_send}
            again = [r for rid, r in self.by_id.items()
                     if rid in self.open_ids and rid not in queued]
            self.resubmitted += len(again)
            self.to_send = collections.deque(sorted([*again, *self.to_send],
                                                    key=lambda r: self.order[r.id]))
            self.unacked.clear()
        self.daemon_pid = pid

    def _reply(self, msg: wire.Reply) -> Iterator[Answer]:
        # only ids this submit sent count: a reply naming others (a program that is not
        # the daemon, or a bug) must not answer or resend what was never sent
        sent = [rid for rid in dict.fromkeys(msg.ids) if rid in self.sent_at]
        self.unacked.difference_update(sent)
        if msg.status in ("busy", CANCELLED) and self.cancel_at is not None:
            for rid in sent:                   # not queued there, never to be sent again
                if rid in self.open_ids:
                    self.open_ids.discard(rid)
                    yield Answer(rid, self.by_id[rid].path, CANCELLED, None, None,
                                 (time.monotonic() - self.sent_at[rid]) * 1e3)
        elif msg.status == "busy":             # back off, then resend these
            queued = {r.id for r in self.to_send}
            self.to_send.extendleft(reversed([self.by_id[i] for i in sent
                                              if i in self.open_ids and i not in queued]))
            self.resend_after = time.monotonic() + BUSY_BACKOFF_S
        elif msg.status == "error":
            # without ids (a malformed submit) it is about the chunk in flight
            for rid in (sent if msg.ids else tuple(self.unacked)):
                self.unacked.discard(rid)
                if rid in self.open_ids:
                    self.open_ids.discard(rid)
                    yield Answer(rid, self.by_id[rid].path, wire.ERROR, None, msg.message,
                                 (time.monotonic() - self.sent_at[rid]) * 1e3)


def _wire_size(r: wire.Request) -> int:
    """About the bytes one request adds to a submit header (msgpack, with its field names)."""
    return (len(r.id.encode()) + len(r.path.encode())
            + len((r.ann or "").encode()) + 48)


def _unsendable(r: wire.Request) -> str | None:
    for what, value in (("path", r.path), ("ground-truth path", r.ann)):
        problem = name_problem(value) if value is not None else None
        if problem is not None:
            return problem if what == "path" else f"ground truth: {problem}"
        if value is not None and len(value) > wire.MAX_STRING_CHARS:
            return f"{what} longer than {wire.MAX_STRING_CHARS} characters"
        if value is not None and "\x00" in value:
            return f"{what} contains a NUL byte"
    return None
