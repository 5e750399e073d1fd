"""Trust only what the daemon handed out: per-request tokens and workers' identities.

The front draws a random secret at start and gives it to the workers it starts in their
start document (a pipe, never a file); with `--transport tcp` the secret is derived from
the worker key (core.keys), so that a worker on another host, which holds that key, holds
it too. From the secret:

- a request's token: HMAC(secret, id, attempt, the executor the front dispatched it to),
  carried in the request from the front to preprocess, the executor and postprocess and
  echoed in its answer. The executor takes pixels, postprocess an output, and the front an
  answer only when the token verifies for that request and that executor: a process that
  can reach a socket but was never handed the request cannot forge its data or its answer;
- a worker's identity on its sockets: its name (stage-index-pid), the socket's role and a
  tag, HMAC(secret, name/role). The front takes heartbeats, notes and answers, and an
  executor takes postprocess credits, only under an identity whose tag verifies; on ipc the
  front also holds the name's pid to the pid the kernel reports for the connection.

Each stage calls these at the one point where its socket's messages are read; what fails
is counted (`forged_dropped`), logged at most once per REFUSAL_LOG_S per peer, and dropped.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pspnet.core import wire

SECRET_BYTES = 32
TOKEN_HEX = 32                  # 128 bits of HMAC-SHA256, in hex
ROLES = ("main", "vouch", "credits")   # the sockets a worker opens to another (notes and
                                       # answers all leave on "main", in order)
REFUSAL_LOG_S = 10.0            # one log line per peer (and reason) at most this often
MAX_LOGGED_PEERS = 1024         # peers remembered for that; the oldest are forgotten


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


@dataclass(frozen=True)
class Trust:
    """What the daemon's own processes share: the secret, and the checks made with it.

    `own`: with tcp, a second secret only the front and the workers it started hold: their
    control sockets' identities are made with it, so that a worker on another host (which
    holds `secret`, derived from the worker key) cannot speak for one of them. Credits
    identities and tokens stay on `secret`: remote and local workers verify each other's."""

    secret: bytes
    own: bytes | None = None

    def _key(self, role: str) -> bytes:
        base = role.partition(".")[0]
        return self.own if self.own is not None and base != "credits" else self.secret

    def _mac(self, *parts: str, key: bytes | None = None) -> str:
        text = "\0".join(parts).encode("utf-8", "surrogatepass")   # one-shot: C only
        return hmac.digest(key or self.secret, text, "sha256").hex()[:TOKEN_HEX]

    # ---- per-request tokens --------------------------------------------------------------

    @functools.cached_property
    def _request_mac(self) -> Any:
        """HMAC(secret) over the tokens' common prefix, made once: each token copies it
        (the front makes one per dispatched request; a new HMAC object costs 5 x a copy)."""
        return hmac.new(self.secret, b"request\0", hashlib.sha256)

    def token(self, rid: str, attempt: int, executor: str) -> str:
        """The token of request `rid`'s attempt, dispatched with its pixels for `executor`:
        HMAC(secret, "request" NUL id NUL attempt NUL executor), the same bytes `_mac` would
        join, from the prefix's HMAC copied."""
        mac = self._request_mac.copy()
        mac.update(f"{rid}\0{attempt}\0{executor}".encode("utf-8", "surrogatepass"))
        return mac.hexdigest()[:TOKEN_HEX]

    def holds(self, request: wire.Request, executor: str) -> bool:
        """Whether `request` carries the token the front handed out for it and `executor`."""
        return hmac.compare_digest(request.token, self.token(request.id, request.attempt,
                                                             executor))

    def answers(self, result: wire.Result, attempt: int, executor: str | None) -> bool:
        """Whether `result` carries the token of the request attempt it answers."""
        return executor is not None and result.attempt == attempt and hmac.compare_digest(
            result.token, self.token(result.id, attempt, executor))

    # ---- workers' identities -------------------------------------------------------------

    def identity(self, name: str, role: str = "main", connection: int | None = None) -> bytes:
        """The ZeroMQ identity of worker `name`'s `role` socket: name/role/tag, or
        name/role.N/tag for its N-th `connection` of that role, so that a socket made
        again (to a peer that still holds the last one) is a new peer there, not a
        refused duplicate of the old."""
        if connection is not None:
            role = f"{role}.{connection}"
        return f"{name}/{role}/{self._mac('identity', name, role, key=self._key(role))}".encode()

    def name_of(self, identity: bytes) -> str | None:
        """The worker name an identity proves, or None (not one this secret handed out)."""
        proven = self.origin(identity)
        return None if proven is None else proven[0]

    def origin(self, identity: bytes) -> tuple[str, bool] | None:
        """(the worker name an identity proves, whether it is one of the front's own
        workers), or None. Without `own` (ipc) every proven identity is the front's own."""
        try:
            name, role, tag = identity.decode("ascii").split("/")
        except (UnicodeDecodeError, ValueError):
            return None
        base, dot, connection = role.partition(".")
        if base not in ROLES or (dot and not (connection.isdigit() and len(connection) < 10)):
            return None
        for key in dict.fromkeys((self._key(role), self.secret)):
            if hmac.compare_digest(tag, self._mac("identity", name, role, key=key)):
                return name, key is not self.secret or self.own is None
        return None


def peer_pid(frame: Any) -> int | None:
    """The pid of the process at the other end of an ipc connection, as the kernel reports
    it (SO_PEERCRED, in ZeroMQ's Peer-Address "host:uid:gid:pid"); None when unknown."""
    try:
        address = frame.get("Peer-Address")
    except Exception:                  # not a zmq.Frame, or no such property here
        return None
    pid = str(address).rsplit(":", 1)[-1]
    return int(pid) if str(address).count(":") == 3 and pid.isdigit() else None


@dataclass
class Refusals:
    """Counts what a socket refused, and logs it at most once per REFUSAL_LOG_S per peer:
    a flood of forgeries costs a counter, not the log."""

    log: Callable[..., Any]                 # a structlog method: log(event, **fields)
    clock: Callable[[], float] = time.monotonic
    count: int = 0
    _last: dict[str, float] = field(default_factory=dict)

    def refuse(self, peer: str, why: str, **fields: Any) -> None:
        self.count += 1
        now = self.clock()
        key = f"{peer}\0{why}"
        if now - self._last.get(key, -REFUSAL_LOG_S) < REFUSAL_LOG_S:
            return
        self._last.pop(key, None)
        self._last[key] = now
        while len(self._last) > MAX_LOGGED_PEERS:
            self._last.pop(next(iter(self._last)))
        self.log("refused", peer=peer[:80], reason=why, refused_so_far=self.count, **fields)
