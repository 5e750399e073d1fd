"""CurveZMQ on every tcp socket: the key files, the keys each process holds, who is let in.

`pspnet keys DIR` (or `serve --keys DIR`, when DIR holds none yet) writes three key pairs as
zmq.auth certificates, each file 0600 in a 0700 folder:

- server: the daemon. Its control port (workers) and a tcp client endpoint serve CURVE
  with it; a worker or client needs `server.key` (the public half) to connect.
- worker: every worker, the daemon's own and those on other hosts (`pspnet worker --keys
  DIR`, with `worker.key_secret` and `server.key` copied there). The control port admits
  only this key; executors serve their tcp data ports with it and admit only it.
- client: `pspnet submit/status --keys DIR` against a tcp endpoint (`client.key_secret`
  and `server.key`); the endpoint admits only this key.

A peer without the key is refused at the handshake (ZAP, libzmq's CURVE; logged once per
address and reason, at most every core.trust.REFUSAL_LOG_S). With --transport tcp and no
--keys, serve makes fresh keys in memory: only the workers it starts itself can join. The
tokens' secret (core.trust) is then derived from the worker key, so a worker on another
host, which holds that key, verifies them too.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from pspnet.core.trust import Refusals

PAIRS = ("server", "worker", "client")
ENV_KEYS = "PSPNET_KEYS"        # a client's --keys DIR when not given
WORKERS, CLIENTS = "pspnet-workers", "pspnet-clients"     # ZAP domains
SERVER_HANDSHAKE_MS = 5000      # a CURVE handshake is four small messages
HANDSHAKE_FAILURES = {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed",
                      zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "not CURVE, or not this key"}
                                        # (a refused key: KeyAuthenticator logs it, by address)


class KeysError(ValueError):
    """Keys that cannot be read or written: the message names the file and the fix."""


def write_keys(folder: Path) -> list[Path]:
    """Three key pairs in `folder` (made 0700), each file 0600; existing pairs are kept,
    and a folder that holds all three is left as it is (a read-only mount, say)."""
    missing = [name for name in PAIRS if not (folder / f"{name}.key_secret").exists()]
    if not missing:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    written = []
    old = os.umask(0o077)                 # no moment where a secret is readable by others
    try:
        for name in missing:
            public, secret = zmq.auth.create_certificates(str(folder), name)
            for path in (public, secret):
                os.chmod(path, 0o600)
                written.append(Path(path))
    finally:
        os.umask(old)
    return written


def load_pair(folder: Path, name: str, secret: bool = True) -> tuple[bytes, bytes | None]:
    """(public, secret) z85 keys of pair `name` in `folder`; KeysError when unreadable."""
    path = folder / (f"{name}.key_secret" if secret else f"{name}.key")
    try:
        public, private = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeysError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc} "
                        "(`pspnet keys DIR` writes the keys)") from None
    if secret and private is None:
        raise KeysError(f"{path} holds no secret key (`pspnet keys DIR` writes the keys)")
    return public, private


@dataclass(frozen=True)
class Keys:
    """The keys of one process (z85): every worker holds the server's public key and the
    worker pair; the daemon also the server's secret key and the client's public key."""

    server_public: bytes
    worker_public: bytes
    worker_secret: bytes
    server_secret: bytes | None = None
    client_public: bytes | None = None

    @classmethod
    def fresh(cls) -> Keys:
        """In memory, for a daemon without --keys: only the workers it starts can join."""
        server, worker, client = (zmq.curve_keypair() for _ in PAIRS)
        return cls(server[0], worker[0], worker[1], server[1], client[0])

    @classmethod
    def for_daemon(cls, folder: Path) -> Keys:
        """Loads them, after writing those `folder` lacks."""
        write_keys(folder)
        server, worker = load_pair(folder, "server"), load_pair(folder, "worker")
        client = load_pair(folder, "client", secret=False)
        return cls(server[0], worker[0], worker[1] or b"", server[1], client[0])

    @classmethod
    def for_worker(cls, folder: Path) -> Keys:
        """What a worker on another host needs: worker.key_secret and server.key."""
        worker = load_pair(folder, "worker")
        server = load_pair(folder, "server", secret=False)
        return cls(server[0], worker[0], worker[1] or b"")

    def for_children(self) -> dict[str, str]:
        """The worker's share, for the start document (a pipe, never a file)."""
        return {"server_public": self.server_public.decode(),
                "worker_public": self.worker_public.decode(),
                "worker_secret": self.worker_secret.decode()}

    @classmethod
    def from_document(cls, doc: dict[str, str]) -> Keys:
        return cls(doc["server_public"].encode(), doc["worker_public"].encode(),
                   doc["worker_secret"].encode())

    def token_secret(self) -> bytes:
        """The tokens' secret with --transport tcp (core.trust): every worker derives it."""
        return hmac.new(self.worker_secret, b"pspnet request tokens",
                        hashlib.sha256).digest()


def client_keys(folder: Path) -> tuple[bytes, bytes, bytes]:
    """(server public, client public, client secret) for a client of a tcp endpoint."""
    client = load_pair(folder, "client")
    server = load_pair(folder, "server", secret=False)
    return server[0], client[0], client[1] or b""


def serve_curve(sock: zmq.Socket, public: bytes, secret: bytes, domain: str) -> None:
    """Make `sock` (before it binds) a CURVE server whose peers ZAP `domain` admits. A
    peer that has not finished its handshake within SERVER_HANDSHAKE_MS is dropped: libzmq
    allocates a handshake frame up to the socket's ZMQ_MAXMSGSIZE before CURVE has said
    who sent it, and holds it until then (its default, 30 s)."""
    sock.setsockopt(zmq.HANDSHAKE_IVL, SERVER_HANDSHAKE_MS)
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())


def connect_curve(sock: zmq.Socket, server_public: bytes, public: bytes,
                  secret: bytes) -> None:
    """Make `sock` (before it connects) a CURVE client of the server with that key."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)


class KeyAuthenticator(ThreadAuthenticator):
    """ZAP for one context: each domain admits the public keys given to `admit`; a refusal
    is logged once per peer address and reason (rate-limited), never per attempt."""

    def __init__(self, ctx: zmq.Context, refusals: Refusals) -> None:
        super().__init__(ctx)
        self.refusals = refusals
        self.admitted: dict[str, set[bytes]] = {}
        self._address = ""

    def admit(self, domain: str, *keys: bytes) -> None:
        self.admitted.setdefault(domain, set()).update(keys)

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self._address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)

    async def _authenticate_curve(self, domain: str, client_key: bytes,
                                  ) -> tuple[bool, bytes]:
        z85_key = zmq.utils.z85.encode(client_key)
        if z85_key in self.admitted.get(domain, ()):
            return True, b"OK"
        self.refusals.refuse(self._address, "key refused at the handshake", domain=domain)
        return False, b"Unknown key"


def start_authenticator(ctx: zmq.Context, refusals: Refusals, admitted: dict[str, bytes],
                        ) -> KeyAuthenticator:
    """A KeyAuthenticator started on `ctx`, admitting each domain's key."""
    auth = KeyAuthenticator(ctx, refusals)
    auth.start()
    for domain, key in admitted.items():
        auth.admit(domain, key)
    return auth


class HandshakeLog:
    """Logs the handshakes a socket refuses (peers without CURVE or without the key: ZAP
    never hears of those), from a thread, rate-limited per listening address and reason.
    `stop()` before the socket closes: a monitor must not outlive it."""

    def __init__(self, sock: zmq.Socket, refusals: Refusals) -> None:
        events = 0
        for event in HANDSHAKE_FAILURES:
            events |= event
        self.sock, self.refusals = sock, refusals
        self.monitor = sock.get_monitor_socket(events)    # PAIR, read by the thread only
        self.thread = threading.Thread(target=self._run, name="handshakes", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                event: dict[str, Any] = recv_monitor_message(self.monitor)
                if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                    break
                where = event.get("endpoint", b"")
                self.refusals.refuse(
                    where.decode() if isinstance(where, bytes) else str(where),
                    HANDSHAKE_FAILURES.get(event["event"], "handshake failed"))
        except zmq.ZMQError:
            pass                              # the context is ending
        finally:
            self.monitor.close(0)

    def stop(self) -> None:
        self.sock.disable_monitor()           # the thread hears MONITOR_STOPPED and ends
        self.thread.join(timeout=1.0)


CLIENT_REFUSALS = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the daemon refused our key at the CurveZMQ "
                                     "handshake",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "the CurveZMQ handshake failed (server.key is not "
                                         "this daemon's, or the endpoint does not speak CURVE)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the CurveZMQ handshake failed (server.key is not "
                                          "this daemon's?)",
}


class ClientHandshakes:
    """A CURVE client's own failed handshakes, read only when no answer came, so that a
    wrong key names the fix instead of 'no daemon answered'. No thread: libzmq's events
    wait in the monitor's PAIR socket until asked."""

    def __init__(self, sock: zmq.Socket) -> None:
        events = 0
        for event in CLIENT_REFUSALS:
            events |= event
        self.sock = sock
        self.monitor = sock.get_monitor_socket(events)    # PAIR <- libzmq: sock's events
        self.monitor.setsockopt(zmq.LINGER, 0)
        self.why: str | None = None

    def refused(self) -> str | None:
        """Why the daemon refused us, if a handshake failed so far."""
        while self.why is None and self.monitor.poll(0):
            self.why = CLIENT_REFUSALS.get(recv_monitor_message(self.monitor)["event"])
        return self.why

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(0)
