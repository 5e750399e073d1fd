"""Issue 7.5: hostile messages and hostile files.

* The wire decoder under structured fuzzing (random maps with the real field names and
  kinds), and the size limits that keep a lying header from allocating anything.
* The daemon's client endpoint under fire: hypothesis-generated and mutated frames from a
  DEALER, fixed nasty cases (a 4 GB array claim, wrong version, pickle bytes, a submit of a
  million requests, deep nesting, an oversized frame), a REQ, a ROUTER, a PUSH, and a raw
  socket speaking ZMTP that announces a 1 GB frame. The daemon stays up, bounded in memory,
  counts every malformed message, logs at most one warning per sender per minute (and a
  bounded number in all), and still answers a normal submit.
* No pickle anywhere; mask names cannot leave the output directory; a planted symlink is
  never written through; the socket file is 0600 and the runtime directories 0700.
"""

from __future__ import annotations

import os
import pickle
import socket
import stat
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pspnet.core import wire
from pspnet.core.uploads import door_frame_limit
from pspnet.daemon import clients as clients_module
from pspnet.model.manifest import voc_palette
from pspnet.model.masks import mask_path, write_mask
from tests.kit import (
    REPO,
    Daemon,
    MemoryWatch,
    dealer,
    mask_pixels,
    proc_kb,
    status_over,
    submit_all,
)

FIELDS = ["v", "kind", "req", "reqs", "id", "path", "ann", "attempt", "arrays", "place", "head",
          "status", "ids", "body", "message", "to", "address", "credits", "stage", "index",
          "pid", "counters", "inputs", "outputs", "capacity", "batch", "stuck", "fatal",
          "executors", "mask", "error", "size", "found"]
FRONT_GROWTH_BOUND_MB = 64       # front RSS over its idle level while being attacked

scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
           | st.floats(allow_nan=True) | st.text(max_size=24) | st.binary(max_size=24))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=6)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=6),
                      max_leaves=24)
headers = st.builds(
    lambda fields, kind, version: {**fields, "kind": kind, "v": version},
    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), values, max_size=10),
    st.sampled_from(wire.KINDS) | st.text(max_size=8),
    st.sampled_from([wire.WIRE_VERSION] * 4 + [0, 2, "1", None]),
)
extra_frames = st.lists(st.binary(max_size=64), max_size=3)
structured = st.builds(lambda h, rest: [msgpack.packb(h, use_bin_type=True), *rest],
                       headers, extra_frames)
VALID_SUBMIT = wire.encode(wire.Submit((wire.Request("a", "/no/such/a.jpg"),
                                        wire.Request("b", "/no/such/b.jpg", "/no/such/b.png"))))[0]
mutated = st.builds(
    lambda pos, byte, cut: [bytes(VALID_SUBMIT[:pos]) if cut else
                            VALID_SUBMIT[:pos] + bytes([byte]) + VALID_SUBMIT[pos + 1:]],
    st.integers(0, len(VALID_SUBMIT) - 1), st.integers(0, 255), st.booleans())
random_frames = st.lists(st.binary(min_size=0, max_size=256), min_size=1, max_size=5)
any_frames = structured | mutated | random_frames


def decodes(frames: list[bytes], max_submit: int = 1024) -> bool:
    try:
        wire.decode(frames, max_submit=max_submit)
    except wire.WireError:
        return False
    return True


# ---------------------------------------------------------------------------------------
# the decoder alone


@settings(max_examples=600, deadline=None)
@given(structured | mutated)
def test_decoder_survives_structured_fuzz(frames):
    """Maps with the real field names, kinds and versions, any values: WireError or a
    message of the right type, nothing else (no KeyError/TypeError/OverflowError...)."""
    try:
        msg = wire.decode(frames)
    except wire.WireError:
        return
    assert type(msg).__name__ in {"Dispatch", "Image", "Output", "Credit", "Result", "Took",
                                  "Handed", "Heartbeat", "Peers", "Submit", "StatusQuery",
                                  "Reply"}


def nasty_frames() -> dict[str, list[bytes]]:
    """Fixed hostile messages: each must be refused, none may allocate what it claims."""
    def head(**fields):
        return msgpack.packb({"v": wire.WIRE_VERSION, **fields}, use_bin_type=True)

    submit_prefix = (b"\x83" + msgpack.packb("v") + msgpack.packb(1) + msgpack.packb("kind")
                     + msgpack.packb("submit") + msgpack.packb("reqs"))

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch /tmp/pspnet-pickle-ran",))

    req = {"id": "x", "path": "/x.jpg", "attempt": 0}
    return {
        "array32 of 2^32-1 items": [b"\xdd\xff\xff\xff\xff"],
        "map32 of 2^32-1 pairs": [b"\xdf\xff\xff\xff\xff"],
        "str32 of 4 GB": [b"\xdb\xff\xff\xff\xff" + b"x" * 16],
        "bin32 of 4 GB": [b"\xc6\xff\xff\xff\xff" + b"x" * 16],
        "ext32 of 4 GB": [b"\xc9\xff\xff\xff\xff\x01"],
        "submit claiming 1e6 requests": [submit_prefix + b"\xdd" + (10**6).to_bytes(4, "big")
                                         + msgpack.packb(req) * 8],
        "submit of 1,025 requests": [head(kind="submit", reqs=[
            {"id": str(i), "path": "/a", "attempt": 0} for i in range(1025)])],
        "image claiming 4 GB of pixels": [head(kind="image", req=req,
                                               place=[8, 8, 1.0, 0, 0, 8, 8],
                                               arrays=[["uint8", [8192, 8192, 64]]]), b"\0"],
        "image of 65536 x 65536": [head(kind="image", req=req, place=[8, 8, 1.0, 0, 0, 8, 8],
                                        arrays=[["uint8", [65536, 65536, 3]]]), b"\0"],
        "wrong version": [msgpack.packb({"v": 1, "kind": "submit", "reqs": [req]})],
        "no version": [msgpack.packb({"kind": "status"})],
        "pickle header": [pickle.dumps(Evil())],
        "pickle after a valid header": [head(kind="status"), pickle.dumps(Evil())],
        "nested arrays 60,000 deep": [b"\x91" * 60_000 + b"\xc0"],
        "nested maps 20,000 deep": [b"\x81\xa1a" * 20_000 + b"\xc0"],
        "map of 100 keys": [msgpack.packb({str(i): i for i in range(100)})],
        "five frames": [head(kind="status")] + [b""] * 4,
        "empty frame": [b""],
        "not a map": [msgpack.packb([1, 2, 3])],
        "unknown kind": [head(kind="pickle")],
        "NUL in a path": [head(kind="submit", reqs=[{"id": "x", "path": "/a\0b",
                                                     "attempt": 0}])],
        "path of 5000 characters": [head(kind="submit", reqs=[{"id": "x", "path": "/" * 5000,
                                                               "attempt": 0}])],
    }


def test_nasty_headers_are_refused_without_allocating():
    """Every nasty case is a WireError, and decoding all of them 20 times grows a fresh
    process's peak memory by less than 16 MB (the claims add up to terabytes)."""
    for name, frames in nasty_frames().items():
        assert not decodes(frames), name
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from tests.reliability.test_hostile import nasty_frames
        from pspnet.core import wire
        cases = nasty_frames()
        def hwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        before = hwm()
        for _ in range(20):
            for frames in cases.values():
                try:
                    wire.decode(frames, max_submit=1024)
                except wire.WireError:
                    pass
        print(hwm() - before)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    growth_kb = int(out.stdout.split()[-1])
    print(f"\nFIGURE nasty headers: {len(nasty_frames())} cases x 20 decoded, peak memory "
          f"+{growth_kb / 1024:.1f} MB")
    assert growth_kb < 16 * 1024
    assert not Path("/tmp/pspnet-pickle-ran").exists()


def test_no_pickle_anywhere():
    """No pickle, marshal or shelve in the daemon's code; one msgpack.unpackb, in the wire
    module, with every size limit set and no extension hook; ruff's S301 stays enabled."""
    import ast

    banned_modules = {"pickle", "_pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle",
                      "jsonpickle", "yaml"}
    banned_attrs = {"recv_pyobj", "send_pyobj", "recv_serialized", "send_serialized"}
    runtime = [p for folder in ("core", "model", "stages", "daemon", "batch")
               for p in REPO.glob(f"{folder}/**/*.py")]
    assert len(runtime) > 10
    unpack_sites = []
    for path in runtime:
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                names = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
            else:
                names = set()
            assert not names & banned_modules, (path, names)
            if isinstance(node, ast.Attribute):
                assert node.attr not in banned_attrs, (path, node.attr)
                if node.attr in ("unpackb", "unpack", "Unpacker"):
                    unpack_sites.append(path.name)
    assert set(unpack_sites) == {"wire.py"}, unpack_sites
    source = (REPO / "core" / "wire.py").read_text()
    for opening in ("msgpack.unpackb(", "msgpack.Unpacker("):   # messages; stream documents
        start = source.index(opening)
        call = source[start:source.index(")", source.index("max_ext_len", start))]
        for limit in ("max_str_len", "max_bin_len=0", "max_array_len", "max_map_len",
                      "max_ext_len=0", "strict_map_key=True"):
            assert limit in call, (opening, limit)
        assert "ext_hook" not in call and "object_hook" not in call
    assert '"S301"' in (REPO / "pyproject.toml").read_text()


# ---------------------------------------------------------------------------------------
# file names and permissions


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300) | st.builds(lambda parts: "/".join(parts),
                                         st.lists(st.sampled_from(
                                             ["..", ".", "", "a", "b.jpg", "\\..", "..\\x",
                                              "/etc", "~", ".hidden", "x.png"]),
                                             max_size=6)))
def test_mask_names_never_leave_the_output_directory(tmp_path_factory, name):
    out = tmp_path_factory.getbasetemp() / "mask-names"
    out.mkdir(exist_ok=True)
    try:
        target = mask_path(out, name)
    except ValueError:
        return
    assert target.is_relative_to(out.resolve()), (name, target)
    assert ".." not in target.relative_to(out.resolve()).parts
    assert target.suffix == ".png" and "\0" not in str(target)
    assert len(target.name.encode()) <= 255


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "..\\..\\boot.ini",
                                  "a/../../b.jpg", "..", "...", "x\0y.jpg", "/", ""])
def test_mask_names_known_escapes(tmp_path, name):
    try:
        target = mask_path(tmp_path, name)
    except ValueError:
        return
    assert target.is_relative_to(tmp_path.resolve()) and target.name not in (".png", "..png")


def test_write_mask_replaces_a_symlink_it_did_not_check(tmp_path):
    """The race mask_path cannot close (a link planted after its check): write_mask writes a
    temp file (O_EXCL: never through a link) and renames it over the name, which replaces
    the link itself. The file the link pointed at is untouched."""
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_text("do not touch")
    out = tmp_path / "masks"
    out.mkdir()
    link = out / "victim.png"
    link.symlink_to(secret)
    write_mask(np.zeros((4, 4), np.uint8), link, voc_palette(21))
    assert secret.read_text() == "do not touch"
    assert not link.is_symlink()
    mask_pixels(link)
    assert sorted(p.name for p in out.iterdir()) == ["victim.png"]   # no temp file left


def test_runtime_dir_is_private_and_not_adopted(tmp_path, monkeypatch):
    from pspnet.daemon.endpoint import runtime_dir

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    path = runtime_dir()
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    path.chmod(0o755)                                     # loosened: tightened again
    assert stat.S_IMODE(runtime_dir().stat().st_mode) == 0o700
    path.rmdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    path.symlink_to(elsewhere)                            # a link planted in its place
    with pytest.raises(PermissionError, match="not a directory of this user's"):
        runtime_dir()
    path.unlink()
    if os.geteuid() == 0:                                 # someone else's directory
        path.mkdir()
        os.chown(path, 65534, 65534)
        with pytest.raises(PermissionError, match="owned by uid 65534"):
            runtime_dir()


# ---------------------------------------------------------------------------------------
# the daemon's client endpoint


UPLOAD_LIMIT = 1 << 20     # the hostile daemon's --max-upload-bytes: the door's largest frame


@pytest.fixture(scope="module")
def hostile(tiny_models, photo_files, tmp_path_factory):
    """A daemon whose ipc socket sits in a world-writable directory, watched for memory."""
    tmp = tmp_path_factory.mktemp("hostile")
    shared = tmp / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    daemon = Daemon(tiny_models["logits"], tmp / "masks", tmp, "--batch-size", "4",
                    "--max-upload-bytes", str(UPLOAD_LIMIT), endpoint=f"ipc://{shared}/front")
    watch = MemoryWatch(daemon)
    try:
        daemon.wait_ready()
        time.sleep(1.0)
        idle_front_mb = proc_kb(daemon.proc.pid) / 1024
        watch.start()
        yield {"daemon": daemon, "tmp": tmp, "shared": shared, "out": tmp / "masks",
               "idle_front_mb": idle_front_mb, "watch": watch, "photos": photo_files}
    finally:
        try:
            if watch.is_alive():
                watch.stop()
        finally:
            assert daemon.stop() == 0, daemon.logs()


def warnings_from(daemon: Daemon) -> list[dict]:
    return [e for e in daemon.events() if e.get("event") == "malformed client message"]


def zmtp_huge_frame(path: str, claim: int, stream_mb: int) -> int:
    """Speak ZMTP 3.0 over the ipc socket as a DEALER, announce one frame of `claim` bytes
    and stream `stream_mb` MB of it; return how many MB got through before the daemon hung
    up."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(5)
    sock.connect(path)
    sock.sendall(b"\xff" + b"\0" * 8 + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0")
                 + b"\0" * 32)
    sock.recv(64)
    body = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
    sock.sendall(bytes([0x04, len(body)]) + body)
    sock.sendall(b"\x02" + struct.pack(">Q", claim))
    chunk, sent = b"x" * (1 << 20), 0
    try:
        for _ in range(stream_mb):
            sock.sendall(chunk)
            sent += 1
    except OSError:
        pass
    finally:
        sock.close()
    return sent


def test_front_endpoint_survives_hostile_peers(hostile):
    ctx = zmq.Context()
    try:
        attack(hostile, ctx)
    finally:                      # a failure must not leave sockets for the GC to block on
        ctx.destroy(linger=0)


def attack(hostile: dict, ctx: zmq.Context) -> None:
    daemon, endpoint = hostile["daemon"], hostile["daemon"].endpoint
    started = time.monotonic()
    expected_malformed = 0
    fuzzer = dealer(ctx, endpoint, b"fuzzer-1")
    sent = {"n": 0}

    @settings(max_examples=800, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(any_frames)
    def fuzz(frames):
        nonlocal expected_malformed
        fuzzer.send_multipart(frames)
        sent["n"] += 1
        expected_malformed += not decodes(frames)
        while fuzzer.poll(0):                    # replies: drop them as they come
            fuzzer.recv_multipart()

    fuzz()
    assert status_over(fuzzer)["front"]["malformed"] == expected_malformed

    nasty = dealer(ctx, endpoint, b"nasty-1")
    for frames in nasty_frames().values():
        nasty.send_multipart(frames)
        expected_malformed += 1
    assert status_over(nasty)["front"]["malformed"] == expected_malformed

    # a frame over the limit (an upload's, --max-upload-bytes): ZeroMQ hangs up on that
    # peer before buffering it
    big = dealer(ctx, endpoint, b"oversize-1")
    big.send_multipart([b"\x80" + b"x" * (door_frame_limit(UPLOAD_LIMIT) + 10)])
    # a raw socket announcing a 1 GB frame and streaming 64 MB of it
    ipc_path = endpoint[len("ipc://"):]
    streamed_mb = zmtp_huge_frame(ipc_path, 1 << 30, 64)
    # other socket types: REQ (an empty delimiter frame first), ROUTER, PUSH (refused)
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(endpoint)
    req.send_multipart(wire.encode(wire.StatusQuery()))
    expected_malformed += 1                       # [b"", header]: the header is b""
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.CONNECT_ROUTING_ID, b"the-daemon")
    router.connect(endpoint)
    time.sleep(0.2)
    router.send_multipart([b"the-daemon", b"\xc1garbage"])
    expected_malformed += 1
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(endpoint)
    # a flood of fresh senders: each is a new identity, the log must stay bounded
    flood = 60
    for i in range(flood):
        s = dealer(ctx, endpoint, f"flood-{i}".encode())
        s.send_multipart([b"\xc1"])
        expected_malformed += 1
        status_over(s)
        s.close(0)
    time.sleep(0.5)
    status = status_over(fuzzer)
    assert daemon.proc.poll() is None, daemon.logs()
    assert status["front"]["malformed"] == expected_malformed

    # still serving, correctly
    photo = hostile["photos"][0]
    (answer,), _ = submit_all(endpoint, [photo], timeout_s=60)
    assert answer.status == "ok", answer.error
    mask_pixels(answer.mask)

    elapsed = time.monotonic() - started
    lines = warnings_from(daemon)
    per_sender = {}
    for e in lines:
        per_sender[e["client"]] = per_sender.get(e["client"], 0) + 1
    minutes = int(elapsed // 60) + 1
    assert 1 <= per_sender.get(b"fuzzer-1".hex(), 0) <= minutes, per_sender
    assert per_sender.get(b"nasty-1".hex(), 0) <= minutes, per_sender
    assert len(lines) <= clients_module.WARN_LINES_PER_MIN * minutes, len(lines)
    senders = 2 + 2 + flood                        # fuzzer, nasty, REQ, ROUTER, the flood
    assert senders > clients_module.WARN_LINES_PER_MIN
    peaks = hostile["watch"].peaks
    front_peak = max(peaks.get("front", 0), proc_kb(daemon.proc.pid, "VmHWM") / 1024)
    growth = front_peak - hostile["idle_front_mb"]
    print(f"\nFIGURE hostile front: {sent['n']} hypothesis examples + "
          f"{len(nasty_frames())} nasty + 1 oversized frame + ZMTP 1 GB claim ({streamed_mb} "
          f"MB accepted before hang-up) + REQ/ROUTER/PUSH + {flood} fresh senders; "
          f"malformed counted {status['front']['malformed']}, warning lines {len(lines)} "
          f"from {senders} senders; front RSS idle {hostile['idle_front_mb']:.0f} MB, "
          f"peak {front_peak:.0f} MB (+{growth:.0f}, bound +{FRONT_GROWTH_BOUND_MB}); "
          f"{elapsed:.1f} s")
    assert streamed_mb < 8, "the daemon kept reading an oversized frame"
    assert growth < FRONT_GROWTH_BOUND_MB
    assert not Path("/tmp/pspnet-pickle-ran").exists()


def test_client_socket_is_0600_and_run_dir_0700(hostile):
    """The socket file sits in a world-writable directory here: it is 0600 (and was from
    the start: bound under umask 077). The front's internal run dir is 0700."""
    sock = Path(hostile["daemon"].endpoint[len("ipc://"):])
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    (starting,) = [e for e in hostile["daemon"].events() if e.get("event") == "starting"]
    run_dir = Path(starting["run_dir"])
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    assert run_dir.stat().st_uid == os.getuid()
    inside = list(run_dir.iterdir())
    assert sorted(p.name for p in inside) == ["control", "exec0-in", "exec0-out"]
    assert all(stat.S_ISSOCK(p.stat().st_mode) for p in inside)


def test_planted_symlink_in_output_dir_is_not_followed(hostile):
    """A link named like the next mask, pointing outside: the request is answered with an
    error naming the link, and the file it points at is unchanged."""
    secret = hostile["tmp"] / "secret.txt"
    secret.write_text("do not touch")
    photo = hostile["photos"][1]
    link = mask_path(hostile["out"], photo)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(secret)
    (answer,), _ = submit_all(hostile["daemon"].endpoint, [photo], timeout_s=60)
    assert answer.status == "error" and "symbolic link" in answer.error, answer
    assert secret.read_text() == "do not touch" and link.is_symlink()


def test_client_sends_long_paths_in_small_enough_chunks(hostile):
    """64 paths of 3,000 characters make a 190 KB submit: over the daemon's 64 KiB header
    limit, so the daemon refused it whole and the client waited forever. The client now
    cuts chunks by size, and answers a path the wire cannot carry itself."""
    long_dir = "/" + "/".join(["d" * 200] * 14)            # about 2,800 characters
    paths = [f"{long_dir}/{i:04d}.jpg" for i in range(64)] + ["/" + "x" * 5000 + ".jpg"]
    answers, _ = submit_all(hostile["daemon"].endpoint, paths, timeout_s=60)
    assert len(answers) == 65 and len({a.id for a in answers}) == 65
    assert all(a.status == "error" for a in answers)
    assert not [a for a in answers if "timed out" in a.error]
    assert all("no such file" in a.error for a in answers if a.path != paths[-1])
    (too_long,) = [a for a in answers if a.path == paths[-1]]
    assert "longer than 4096" in too_long.error
