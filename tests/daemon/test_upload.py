"""Issue 26, parts 2-4: a client sends the encoded image, not a path, and gets its mask
back in the answer; bounded (--max-upload-bytes, --max-upload-inflight, --max-queue), and
over CurveZMQ on tcp."""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from pspnet.core import wire
from pspnet.daemon.client import Client
from pspnet.daemon.clients import upload_problem
from pspnet.daemon.submit import on_another_host
from pspnet.daemon.upload_budget import BUSY, UploadBudget
from pspnet.daemon.uploads_client import Upload, UploadSide
from pspnet.model.masks import mask_path
from tests.conftest import copy_files
from tests.kit import Submitter, free_port, kill9, mask_pixels, submit_all

ARGS = ("--batch-size", "4", "--preprocess-workers", "1", "--postprocess-workers", "1")


# ---- the wire ----------------------------------------------------------------------------

def test_uploads_and_returned_masks_travel_as_raw_frames() -> None:
    jpeg, png = b"\xff\xd8\xff" + bytes(range(256)) * 40, b"\x89PNG" + b"x" * 5000
    submit = wire.Submit((wire.Request("a", "/c/a.jpg", want="png", write=False, data=jpeg),
                          wire.Request("b", "/c/b.jpg")))
    frames = wire.encode(submit)
    assert len(frames) == 2 and frames[1] == jpeg          # the bytes: a frame of their own
    assert len(frames[0]) < 200                            # not in the header
    back = wire.decode(frames)
    assert bytes(back.requests[0].data) == jpeg and back.requests[0].want == "png"
    assert back.requests[0].write is False and back.requests[1].data is None
    result = wire.Result("a", 0, wire.OK, "/c/a.jpg", size=(2, 3), payload=png,
                         returned=wire.WANT_PNG)
    frames = wire.encode(result)
    assert len(frames) == 2 and len(frames[0]) < 300
    assert bytes(wire.decode(frames).payload) == png
    labels = wire.Result("a", 0, wire.OK, "/c/a.jpg", size=(2, 3), payload=b"\x01" * 5,
                         returned=wire.WANT_LABELS)
    with pytest.raises(wire.WireError, match="height x width"):
        wire.decode(wire.encode(labels))
    with pytest.raises(ValueError, match="alone"):
        wire.encode(wire.Results((result, result)))
    orphan = wire.encode(submit)
    with pytest.raises(wire.WireError, match="exactly one request"):
        wire.decode([orphan[0], orphan[1], b"extra"])


def test_upload_flags_that_do_not_go_together_are_refused_in_one_line(tmp_path) -> None:
    for flags, words in ((["--out", str(tmp_path)], "go with --upload"),
                         (["--upload", "--ann", "a.png"], "not with --upload")):
        run = subprocess.run([sys.executable, "-m", "pspnet", "submit", "x.jpg", *flags,
                              "--endpoint", f"ipc://{tmp_path}/none"],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and words in run.stderr, run.stderr
        assert len(run.stderr.strip().splitlines()) == 1


def test_a_daemon_on_another_host_gets_the_bytes_without_being_asked() -> None:
    assert on_another_host("tcp://10.0.0.5:5555")
    assert on_another_host("tcp://gpu-host.example:5555")
    assert not on_another_host("tcp://127.0.0.1:5555")
    assert not on_another_host("tcp://localhost:5555")
    assert not on_another_host("ipc:///run/pspnet/front")
    assert not on_another_host("ipc://@pspnet")             # abstract: this host's


def test_the_client_side_answers_what_it_cannot_send(tmp_path) -> None:
    """A file that cannot be read, one over the daemon's limit, and every upload to a
    daemon that states no limit (older than uploads) are answered here, never sent."""
    ok, big = tmp_path / "ok.jpg", tmp_path / "big.jpg"
    ok.write_bytes(b"\xff\xd8\xff" + b"x" * 100)
    big.write_bytes(b"x" * 1000)
    reqs = [wire.Request(str(i), str(p)) for i, p in
            enumerate([ok, big, tmp_path / "missing.jpg", tmp_path])]
    side = UploadSide(Upload())
    queue = collections.deque(side.requests(reqs))
    assert side.chunk(queue, lambda r, why: None) is None     # the limit not known yet
    side.heard({"daemon": {"max_upload_bytes": 500}})
    refused: dict[str, str] = {}
    chunk = side.chunk(queue, lambda r, why: refused.update({r.path: why}))
    assert [r.path for r in chunk] == [str(ok)] and bytes(chunk[0].data) == ok.read_bytes()
    assert chunk[0].want == "png" and chunk[0].write is False
    assert "--max-upload-bytes 500: send it as a JPEG" in refused[str(big)]
    assert refused[str(tmp_path / "missing.jpg")].endswith("missing.jpg: no such file")
    assert refused[str(tmp_path)] == f"cannot read {tmp_path}: is a directory"
    old = UploadSide(Upload())
    old.heard({"daemon": {"pid": 1}})
    gone: list[str] = []
    assert old.chunk(collections.deque(reqs), lambda r, why: gone.append(why)) == []
    assert len(gone) == 4 and "takes no uploads" in gone[0]
    assert upload_problem(wire.Request("a", "/x.jpg", ann="/x.png", data=b"x"))


def test_the_upload_budget_is_per_client_and_frees_on_answer() -> None:
    budget = UploadBudget(per_client=1000, max_upload=600)
    assert budget.admit(b"A", "1", 600) is None
    assert budget.admit(b"A", "2", 500) == BUSY              # A's share is full
    assert budget.admit(b"B", "1", 500) is None              # B has its own
    assert "--max-upload-bytes" in budget.admit(b"A", "3", 601)   # never fits: an error
    budget.release(b"A", "1")
    assert budget.admit(b"A", "2", 500) is None
    budget.release(b"A", "2")
    budget.release(b"B", "1")
    assert budget.total == 0 and budget.by_client == {}


# ---- a daemon ----------------------------------------------------------------------------

def test_uploads_come_back_as_the_masks_the_daemon_writes_by_path(
        tiny_models, photo_files, tmp_path, daemons) -> None:
    """The must-show: a client whose folder the daemon never reads (deleted once the bytes
    are in memory, before they are sent) gets masks byte for byte the files the daemon
    writes for the same images by path; named as the daemon names them, in the client's
    folder; labels and classes as asked; nothing written by the daemon unless asked."""
    out = tmp_path / "masks"
    daemon = daemons(tiny_models["logits"], out, tmp_path, *ARGS)
    daemon.wait_ready()
    src = copy_files(photo_files[:12], tmp_path / "client-src")
    by_path, _ = submit_all(daemon.endpoint, src)
    assert sorted(a.status for a in by_path) == ["ok"] * len(src)
    written = {a.path: Path(a.mask).read_bytes() for a in by_path}
    found = {a.path: a.found for a in by_path}
    shutil.rmtree(out)
    cli_out = tmp_path / "cli-masks"                        # pspnet submit --upload --out
    run = subprocess.run([sys.executable, "-m", "pspnet", "submit", "--upload", "--out",
                          str(cli_out), "--endpoint", daemon.endpoint, "--json",
                          *map(str, src[:4])], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [d["status"] for d in lines] == ["ok"] * 4
    for d in lines:
        assert d["mask"] == str(mask_path(cli_out, d["path"]))
        assert Path(d["mask"]).read_bytes() == written[d["path"]]
    images = [(str(p), p.read_bytes()) for p in src]
    shutil.rmtree(tmp_path / "client-src")                  # the daemon cannot read them
    mine = tmp_path / "client-masks"
    with Client(daemon.endpoint) as client:
        answers = list(client.upload(images, Upload(out_dir=mine)))
        labels = list(client.upload(images[:3], Upload(want=wire.WANT_LABELS)))
        classes = list(client.upload(images[:3], Upload(want=wire.WANT_CLASSES)))
    assert sorted(a.status for a in answers) == ["ok"] * len(src), answers
    for a in answers:
        assert a.png == written[a.path], a.path              # byte for byte
        assert a.mask == str(mask_path(mine, a.path))
        assert Path(a.mask).read_bytes() == written[a.path]
        assert a.found == found[a.path]
    assert not out.exists() or not any(out.rglob("*.png"))   # write not asked: none
    for a in labels:
        assert a.png is None and a.labels.dtype == np.uint8
        assert np.array_equal(a.labels, mask_pixels(mask_path(mine, a.path)))
    for a in classes:
        assert a.png is None and a.labels is None and a.found == found[a.path]
    with Client(daemon.endpoint) as client:
        (kept,) = client.upload(images[:1], Upload(write=True))
    assert kept.mask == str(mask_path(out, kept.path))
    assert Path(kept.mask).read_bytes() == written[kept.path]
    status = daemon.status()
    assert status["daemon"]["uploads"] == 4 + len(src) + 3 + 3 + 1
    assert daemon.stop() == 0, daemon.tail()


def test_oversized_and_garbage_uploads_are_one_error_each_and_limits_hold(
        tiny_models, photo_files, tmp_path, daemons) -> None:
    """--max-upload-bytes: a larger file is answered with the reason and never sent;
    bytes that are no image: one error from preprocess; the others are answered ok. With
    --max-upload-inflight at two images' bytes and --max-queue 4, 24 uploads all finish:
    the rest were told `busy` and sent again."""
    sizes = sorted(p.stat().st_size for p in photo_files[:24])
    limit = sizes[-1] + 1
    daemon = daemons(tiny_models["logits"], tmp_path / "masks", tmp_path, *ARGS,
                     "--max-upload-bytes", str(limit),
                     "--max-upload-inflight", str(2 * limit), "--max-queue", "4")
    daemon.wait_ready()
    big = tmp_path / "big.jpg"
    big.write_bytes(photo_files[0].read_bytes() + b"\0" * limit)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(os.urandom(5000))
    paths = [*photo_files[:24], big, junk]
    with Client(daemon.endpoint) as client:
        answers = {a.path: a for a in client.submit(paths, upload=Upload(want="classes"))}
    assert len(answers) == len(paths)
    assert answers[str(big)].status == wire.ERROR
    assert "--max-upload-bytes" in answers[str(big)].error
    assert answers[str(junk)].status == wire.ERROR and answers[str(junk)].error
    ok = [a for a in answers.values() if a.status == wire.OK]
    assert len(ok) == 24
    status = daemon.status()
    assert status["daemon"]["upload_busy"] > 0, status["daemon"]      # the bound bit
    assert status["daemon"]["busy_replies"] > 0, status["daemon"]     # --max-queue too
    assert status["front"]["errors"] == 1                              # junk: one answer
    assert daemon.stop() == 0, daemon.tail()


def test_uploads_held_by_a_killed_worker_are_retried_with_their_bytes(
        tiny_models, photo_files, tmp_path, daemons) -> None:
    """The front keeps an upload's bytes until its answer: the preprocess worker killed
    (kill -9) while it holds uploads, they are dispatched again to its replacement, and
    every image is answered once, its mask the one the daemon writes by path."""
    daemon = daemons(tiny_models["logits"], tmp_path / "masks", tmp_path, *ARGS)
    daemon.wait_ready()
    src = copy_files(photo_files[:60], tmp_path / "src")
    by_path, _ = submit_all(daemon.endpoint, src)
    written = {a.path: Path(a.mask).read_bytes() for a in by_path}
    worker = daemon.status()["stages"]["preprocess"]["pids"][0]
    os.kill(worker, signal.SIGSTOP)          # it holds what it is given, then dies
    job = Submitter(daemon.endpoint, src, upload=Upload())
    job.start()
    deadline = time.monotonic() + 60
    while daemon.status()["front"]["at"].get("preprocess", 0) == 0:
        assert time.monotonic() < deadline and job.is_alive(), "no upload at preprocess"
        time.sleep(0.01)
    kill9(worker)
    job.join(180)
    assert job.error is None, job.error
    assert sorted(a.path for a in job.answers) == sorted(map(str, src))
    retried = [a for a in job.answers if a.status != wire.OK]
    assert all("retry" in (a.error or "") for a in retried), retried
    assert all(a.png == written[a.path] for a in job.answers if a.status == wire.OK)
    status = daemon.wait_all_alive()
    assert status["front"]["restarts"] == 1
    assert status["front"]["retried"] > 0, status["front"]
    print(f"\nFIGURE preprocess killed holding uploads: {status['front']['retried']} "
          f"retried, {len(job.answers) - len(retried)} of {len(src)} masks back")
    assert daemon.stop() == 0, daemon.tail()


def test_uploads_over_tcp_need_the_client_key(tiny_models, photo_files, tmp_path,
                                             daemons) -> None:
    """With a tcp endpoint the bytes travel over the door's CurveZMQ: a client with the
    key gets its masks; a peer without it is refused at the handshake, and nothing it
    sent is accepted."""
    daemon = daemons(tiny_models["logits"], tmp_path / "masks", tmp_path, *ARGS,
                     endpoint=f"tcp://127.0.0.1:{free_port()}")
    daemon.wait_ready()
    images = [(str(p), p.read_bytes()) for p in photo_files[:4]]
    with Client(daemon.endpoint) as client:
        answers = list(client.upload(images, timeout_s=120))   # a stall fails, not hangs
    assert sorted(a.status for a in answers) == ["ok"] * 4, (answers, daemon.tail())
    assert all(a.png and a.png.startswith(b"\x89PNG") for a in answers)
    ctx = zmq.Context()
    try:
        plain = ctx.socket(zmq.DEALER)                      # no CURVE: refused
        plain.setsockopt(zmq.LINGER, 0)
        plain.connect(daemon.endpoint)
        try:    # once the handshake has failed a DEALER has no peer, and a send would block
            plain.send_multipart(wire.encode(wire.Submit((wire.Request(
                "x", "/x.jpg", want="png", write=False, data=images[0][1]),))),
                flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            pass                                            # refused before it could send
        assert not plain.poll(2000), "an unauthenticated peer was answered"
    finally:
        ctx.destroy(linger=0)
    status = daemon.status()
    assert status["daemon"]["uploads"] == 4, status["daemon"]
    assert daemon.stop() == 0, daemon.tail()


def test_what_comes_back_is_checked_before_it_is_written_or_shaped(tmp_path) -> None:
    """An endpoint that is not the daemon (or a bug) may answer an upload with anything:
    a "PNG" that is not one was written under the client's --out as the mask, and a label
    map of the wrong length crashed the client (numpy's reshape). Now each is that
    answer's error, and nothing is written."""
    from pspnet.daemon.client import Answer
    from pspnet.daemon.uploads_client import returned_answer

    asked = Answer("u-0", "/photos/a.jpg", wire.OK, None, None, 1.0)
    out = tmp_path / "out"
    not_png = wire.Result("u-0", 0, wire.OK, payload=b"#!/bin/sh\n" * 100,
                          returned=wire.WANT_PNG, size=(10, 10))
    answer = returned_answer(asked, not_png, Upload(out_dir=out))
    assert answer.status == wire.ERROR and "not a PNG (1000 bytes)" in answer.error
    assert not out.exists() or not any(out.rglob("*"))
    short = wire.Result("u-0", 0, wire.OK, payload=b"\0" * 99, returned=wire.WANT_LABELS,
                        size=(10, 10))
    answer = returned_answer(asked, short, Upload(want=wire.WANT_LABELS))
    assert answer.status == wire.ERROR and "99 bytes, not 10 x 10" in answer.error
    good = wire.Result("u-0", 0, wire.OK, payload=b"\1" * 100, returned=wire.WANT_LABELS,
                       size=(10, 10))
    assert returned_answer(asked, good, Upload(want=wire.WANT_LABELS)).labels.shape == (10, 10)
