"""core.keys: the key files, and CurveZMQ sockets that admit one key and log the rest."""

from __future__ import annotations

import stat

import pytest
import zmq

from pspnet.core.keys import (
    ENV_KEYS,
    WORKERS,
    HandshakeLog,
    Keys,
    KeysError,
    connect_curve,
    serve_curve,
    start_authenticator,
    write_keys,
)
from pspnet.core.trust import Refusals
from pspnet.daemon.client import Client


def test_keys_are_written_private_kept_and_read_back(tmp_path):
    folder = tmp_path / "keys"
    written = write_keys(folder)
    assert len(written) == 6 and stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in written} == {0o600}
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert write_keys(folder) == []                       # kept, not replaced
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    daemon, worker = Keys.for_daemon(folder), Keys.for_worker(folder)
    assert (worker.server_public, worker.worker_public, worker.worker_secret) == (
        daemon.server_public, daemon.worker_public, daemon.worker_secret)
    assert daemon.server_secret and daemon.client_public
    assert worker.token_secret() == daemon.token_secret() != Keys.fresh().token_secret()
    (folder / "worker.key_secret").unlink()
    with pytest.raises(KeysError, match="worker.key_secret.*pspnet keys DIR"):
        Keys.for_worker(folder)


def test_a_tcp_client_needs_keys_before_any_socket(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_KEYS, raising=False)
    with pytest.raises(ValueError, match="--keys DIR"):
        Client("tcp://127.0.0.1:5555")
    with pytest.raises(ValueError, match="client.key_secret"):
        Client("tcp://127.0.0.1:5555", tmp_path / "none")
    write_keys(tmp_path / "keys")
    Client("tcp://127.0.0.1:5555", tmp_path / "keys").close()


def test_only_the_admitted_key_gets_through_and_refusals_are_logged_once(tmp_path):
    """A peer with the worker key is heard; one without CURVE and one with another key
    never deliver a frame, and each refusal is logged once per address and reason."""
    keys = Keys.fresh()
    lines: list[dict] = []
    refusals = Refusals(lambda event, **fields: lines.append(fields))
    ctx, peers = zmq.Context(), zmq.Context()
    auth = start_authenticator(ctx, refusals, {WORKERS: keys.worker_public})
    server = ctx.socket(zmq.ROUTER)                 # <- the three peers' DEALERs
    serve_curve(server, keys.server_public, keys.server_secret or b"", WORKERS)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    handshakes = HandshakeLog(server, refusals)
    try:
        sent = []
        for name, pair in (("worker", (keys.worker_public, keys.worker_secret)),
                           ("plain", None), ("other", zmq.curve_keypair())):
            peer = peers.socket(zmq.DEALER)         # -> the server's ROUTER
            peer.setsockopt(zmq.LINGER, 0)
            if pair is not None:
                connect_curve(peer, keys.server_public, *pair)
            peer.connect(f"tcp://127.0.0.1:{port}")
            for _ in range(5):
                try:    # a refused peer's DEALER has no pipe left: a send would block
                    peer.send(name.encode(), zmq.NOBLOCK)
                except zmq.Again:
                    assert name != "worker"
            sent.append(peer)
        heard = []
        while server.poll(1500):
            heard.append(server.recv_multipart()[1])
        assert heard == [b"worker"] * 5
        reasons = [f["reason"] for f in lines]
        assert "key refused at the handshake" in reasons, lines
        assert {"handshake failed", "not CURVE, or not this key"} & set(reasons), lines
        assert len(reasons) == len(set((f["peer"], f["reason"]) for f in lines)), lines
    finally:
        handshakes.stop()
        server.close(0)
        auth.stop()
        ctx.term()
        peers.destroy(0)


@pytest.mark.parametrize("wrong", ["client key", "server key"])
def test_a_refused_client_is_told_which_keys_to_use(tmp_path, wrong):
    """A stand-in daemon (CURVE, ZAP admitting the client key of `pspnet keys`): the
    right keys are answered; a client whose key it does not admit, or that holds another
    daemon's server.key, gets KeyRefused naming --keys and the files, within the status
    timeout, not 'no daemon answered' (and never a send that blocks for ever)."""
    import shutil
    import threading

    from pspnet.core import wire
    from pspnet.core.keys import CLIENTS
    from pspnet.daemon.client import KeyRefused

    good, other = tmp_path / "good", tmp_path / "other"
    write_keys(good)
    write_keys(other)
    mixed = tmp_path / "mixed"                  # the other folder, one file from the good
    shutil.copytree(other, mixed)
    keep = "server.key" if wrong == "client key" else "client.key_secret"
    shutil.copy(good / keep, mixed / keep)
    keys = Keys.for_daemon(good)
    ctx = zmq.Context()
    auth = start_authenticator(ctx, Refusals(lambda event, **fields: None),
                               {CLIENTS: keys.client_public or b""})
    server = ctx.socket(zmq.ROUTER)             # plays the daemon's door: queries in, replies out
    server.setsockopt(zmq.LINGER, 0)
    serve_curve(server, keys.server_public, keys.server_secret or b"", CLIENTS)
    endpoint = f"tcp://127.0.0.1:{server.bind_to_random_port('tcp://127.0.0.1')}"
    stop = threading.Event()

    def answer() -> None:
        while not stop.is_set():
            if server.poll(100):
                peer, *_ = server.recv_multipart()
                server.send_multipart([peer, *wire.encode(wire.Reply("status", body={}))])

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        with Client(endpoint, good) as client:
            assert client.status(timeout_s=10) == {}
        with Client(endpoint, mixed) as client:
            with pytest.raises(KeyRefused, match=r"--keys DIR .*client.key_secret and "
                                                 r"server.key"):
                client.status(timeout_s=3)
            with pytest.raises(KeyRefused):     # and the next send does not block
                list(client.submit(["/x.jpg"], connect_timeout_s=3))
    finally:
        stop.set()
        thread.join()
        auth.stop()
        ctx.destroy(linger=0)
