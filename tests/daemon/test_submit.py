"""Issue 24: `pspnet submit` as a user meets it: what it takes (files, folders, --list,
stdin), what each answer says (size, classes and their share, where the mask went), and
Ctrl-C (the queued requests cancelled in the daemon, a summary line, exit 130)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
from PIL import Image

from pspnet.core import wire
from pspnet.core.exits import EXIT_INTERRUPTED, EXIT_USAGE
from pspnet.daemon.client import Answer
from pspnet.daemon.ledger import EXECUTOR, QUEUED, Ledger
from pspnet.daemon.submit import NoImages, gather, readable
from pspnet.model.masks import mask_path
from tests.kit import watch_record


def tree(root: Path, *names: str) -> list[Path]:
    out = []
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        out.append(path)
    return out


def test_gather_takes_files_folders_lists_and_stdin(tmp_path: Path) -> None:
    a, b, c, d, _hidden, _text = tree(tmp_path, "in/a.jpg", "in/b.PNG", "in/sub/c.jpg",
                                      "in/sub/deep/d.webp", "in/.hidden.jpg", "in/notes.txt")
    folder = str(tmp_path / "in")
    assert gather([folder]) == [str(a), str(b)]
    assert gather([folder], recursive=True) == [str(a), str(b), str(c), str(d)]
    listing = tmp_path / "list.txt"
    listing.write_text(f"{c}\n\n  {d}  \n")
    assert gather([str(a)], listing=str(listing)) == [str(a), str(c), str(d)]
    stdin = io.StringIO(f"{b}\n{a}\n")
    assert gather(["-", "/no/such.jpg"], stdin=stdin) == [str(b), str(a), "/no/such.jpg"]


def test_a_listing_with_a_bom_and_heic_photos_in_folders(tmp_path: Path) -> None:
    """Notepad saves UTF-8 with a BOM: the first path keeps no U+FEFF (it used to come back
    'no such file'). A folder's HEIC photos are not sent, and are collected for a note;
    a folder of nothing else says so."""
    a, b, heic = tree(tmp_path, "in/a.jpg", "in/b.jpg", "in/IMG_0001.HEIC")
    listing = tmp_path / "todo.txt"
    listing.write_bytes(f"\ufeff{a}\r\n{b}\r\n".encode())
    assert gather([], listing=str(listing)) == [str(a), str(b)]
    assert gather(["-"], stdin=io.StringIO(f"\ufeff{b}\n")) == [str(b)]
    skipped: list[str] = []
    assert gather([str(tmp_path / "in")], skipped=skipped) == [str(a), str(b)]
    assert skipped == [str(heic)]
    (only,) = tree(tmp_path, "phone/IMG_0002.heic")
    with pytest.raises(NoImages, match="its 1 HEIC/HEIF/AVIF photos are not read: convert"):
        gather([str(only.parent)], skipped=[])
    with pytest.raises(NoImages, match="its 1 HEIC"):   # this folder's, not all folders'
        gather([str(tmp_path / "in"), str(only.parent)], skipped=[])


def test_a_folder_of_folders_without_r_names_the_flag(tmp_path: Path) -> None:
    tree(tmp_path, "in/sub/c.jpg")
    with pytest.raises(NoImages, match=r"no images .* \(add -r for its subfolders\)"):
        gather([str(tmp_path / "in")])


def test_the_cli_refuses_nothing_to_send_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for args in (["submit"], ["submit", str(tmp_path / "empty"), "-r"],
                 ["submit", "--list", str(tmp_path / "missing.txt")]):
        done = subprocess.run([sys.executable, "-m", "pspnet", *args], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == EXIT_USAGE, done
        assert done.stderr.startswith("pspnet submit: error: ") and \
            done.stderr.count("\n") == 1, done.stderr
    assert done.stderr == (f"pspnet submit: error: --list {tmp_path / 'missing.txt'}: "
                           "No such file or directory\n")


def test_the_ledger_cancels_only_this_clients_queued_requests() -> None:
    ledger = Ledger()
    mine = [ledger.add(f"c{i}", f"/p/{i}.jpg", None, origin=b"me") for i in range(4)]
    theirs = ledger.add("c0", "/p/x.jpg", None, origin=b"them")
    ledger.dispatched([mine[0]], "preprocess-0-1", "executor-0-2")   # a group of one
    ledger.took("executor-0-2", [mine[0].rid])
    dropped = ledger.cancel(b"me", ["c0", "c1", "c3", "unknown"])
    assert [e.client_id for e in dropped] == ["c1", "c3"]          # c0 runs already
    assert [ledger.entries[r].client_id for r in ledger.queue] == ["c2", "c0"]
    assert ledger.entries[theirs.rid].state == QUEUED
    assert ledger.entries[mine[0].rid].state == EXECUTOR
    assert ledger.find(b"me", "c1") is None and ledger.pending == 3
    assert ledger.cancel(b"me", ["c1"]) == []                       # once only


def test_cancel_and_what_was_found_travel_on_the_wire() -> None:
    msg = wire.decode(wire.encode(wire.Cancel(("a-1", "a-2"))))
    assert msg == wire.Cancel(("a-1", "a-2"))
    result = wire.Result("a-1", 0, wire.OK, "/p/a.jpg", mask="/m/p/a.jpg.png", size=(30, 40),
                         found=((0, "background", 1000), (15, "person", 200)))
    assert wire.decode(wire.encode(result)) == result
    header = msgpack.unpackb(wire.encode(result)[0])
    for bad in ([[15, "person"]], [[15, "", 3]], [[-1, "x", 3]], [[2, "x", 0]], "x"):
        with pytest.raises(wire.WireError, match="found"):
            wire.decode([msgpack.packb({**header, "found": bad})])
    with pytest.raises(wire.WireError, match="size"):
        wire.decode([msgpack.packb({**header, "size": [0, 5]})])


def test_a_readable_line_says_size_classes_mask_and_time() -> None:
    answer = Answer("x-0", "/abs/a.jpg", "ok", "/m/abs/a.jpg.png", None, 41.6, (100, 200),
                    ((0, "background", 12000), (15, "person", 6000), (12, "dog", 1500),
                     (8, "cat", 500)))
    assert readable(answer, "a.jpg") == ("a.jpg  200x100  background 60.0 %, person 30.0 %, "
                                         "dog 7.5 % (+1 more)  -> /m/abs/a.jpg.png  (42 ms)")
    doc = answer.as_dict()
    assert (doc["height"], doc["width"]) == (100, 200)
    assert doc["classes"][1] == {"id": 15, "name": "person", "share": 0.3}
    speck = Answer("x-2", "/abs/c.jpg", "ok", "/m/c.png", None, 5.0, (1000, 1000),
                   ((0, "background", 999_990), (9, "chair", 10)))
    assert "background 100.0 %, chair < 0.1 %  -> /m/c.png" in readable(speck, "c.jpg")
    failed = Answer("x-1", "/abs/b.jpg", "error", None, "no such file", 3.0)
    assert readable(failed, "b.jpg") == "b.jpg  error: no such file  (3 ms)"


def test_same_names_in_two_folders_both_masked_with_what_was_found(
        tiny_models, photo_files, tmp_path, daemons):
    """A folder with a/x.jpg and b/x.jpg, sent as `submit DIR -r`: two JSON lines, two
    masks at the places mask_path gives, each answer with the image's size and classes
    whose pixels are the mask's."""
    photos = tmp_path / "photos"
    for sub, photo in zip("ab", photo_files, strict=False):
        (photos / sub).mkdir(parents=True)
        shutil.copy(photo, photos / sub / "x.jpg")
    out = tmp_path / "masks"
    daemon = daemons(tiny_models["logits"], out, tmp_path, "--batch-size", "4",
                     "--preprocess-workers", "1", "--postprocess-workers", "1")
    try:
        daemon.wait_ready()
        done = subprocess.run(
            [sys.executable, "-m", "pspnet", "submit", str(photos), "-r",
             "--endpoint", daemon.endpoint], capture_output=True, text=True, timeout=120)
    finally:
        assert daemon.stop() == 0, daemon.logs()
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]  # not a tty: JSON
    assert sorted(d["path"] for d in lines) == [str(photos / s / "x.jpg") for s in "ab"]
    for doc in lines:
        assert doc["status"] == "ok" and doc["mask"] == str(mask_path(out, doc["path"]))
        with Image.open(doc["path"]) as im:
            assert (doc["width"], doc["height"]) == im.size
        with Image.open(doc["mask"]) as im:
            pixels = np.asarray(im)
        counts = np.bincount(pixels.ravel())
        assert {c["id"]: c["share"] for c in doc["classes"]} == pytest.approx(
            {k: n / pixels.size for k, n in enumerate(counts) if n}, abs=1e-5)
    assert len({d["mask"] for d in lines}) == 2


def test_ctrl_c_cancels_the_queued_requests_and_the_daemon_goes_idle(
        tiny_models, photo_files, tmp_path, daemons):
    """SIGINT to `pspnet submit` mid-stream against a slow daemon (4 images/s): exit 130,
    one summary line, no traceback, some requests cancelled; the daemon's queue empties
    (the cancelled ones freed their room) and a new submit is served."""
    daemon = daemons(tiny_models["logits"], tmp_path / "masks", tmp_path, "--batch-size",
                     "4", "--preprocess-workers", "1", "--postprocess-workers", "1",
                     "--backend-option", "img_s=4", backend="sim")
    paths = [str(p) for p in photo_files[:10]] * 6
    try:
        daemon.wait_ready()
        proc = subprocess.Popen(
            [sys.executable, "-m", "pspnet", "submit", "--json", *paths,
             "--endpoint", daemon.endpoint], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        first = proc.stdout.readline()                    # one answered: mid-stream
        assert json.loads(first)["status"] == "ok", first
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
        deadline = time.monotonic() + 20
        while (front := daemon.status()["front"])["queued"] or front["inflight"]:
            assert time.monotonic() < deadline, front
            time.sleep(0.1)
        status = daemon.status()
        again = subprocess.run([sys.executable, "-m", "pspnet", "submit", paths[0],
                                "--endpoint", daemon.endpoint], capture_output=True,
                               text=True, timeout=60)
    finally:
        assert daemon.stop() == 0, daemon.logs()
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    summary = err.strip()
    print(f"\nFIGURE Ctrl-C after the first answer of {len(paths)}: {summary}")
    answered = 1 + len(rest.splitlines())
    words = summary.removeprefix("pspnet submit: interrupted: ").split(", ")
    counts = {w.split()[1]: int(w.split()[0]) for w in words}
    assert counts["answered"] + counts["failed"] == answered, (summary, rest)
    assert counts["cancelled"] > 0 and sum(counts.values()) == len(paths), summary
    assert status["daemon"]["cancelled"] > 0, status["daemon"]
    assert again.returncode == 0 and json.loads(again.stdout)["status"] == "ok", again


def test_the_client_cancels_what_has_not_started_and_a_second_interrupt_stops_waiting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Against a scripted daemon (a ROUTER in this process), chunks of 2: the interrupt
    comes while the first chunk is unanswered. The three never sent are cancelled here,
    the two sent are asked of the daemon, which cancels one (still queued there); the
    other (running) is answered as an error at the second interrupt, without waiting."""
    import threading

    import zmq

    from pspnet.daemon import client as client_module
    from pspnet.daemon.client import CANCELLED, Client

    monkeypatch.setattr(client_module, "CHUNK", 2)
    endpoint = f"ipc://{tmp_path}/front"
    router = zmq.Context.instance().socket(zmq.ROUTER)   # the scripted daemon <- DEALER
    router.bind(endpoint)
    presses = [0]
    seen: list[object] = []

    def daemon() -> None:
        while True:
            who, *frames = router.recv_multipart()
            msg = wire.decode(frames)
            seen.append(msg)
            if isinstance(msg, wire.StatusQuery):
                reply = wire.Reply("status", body={"daemon": {"pid": 1}})
            elif isinstance(msg, wire.Submit):
                presses[0] = 1                 # Ctrl-C before the chunk is acknowledged
                reply = wire.Reply("accepted", tuple(r.id for r in msg.requests))
            else:
                assert isinstance(msg, wire.Cancel)
                reply = wire.Reply("cancelled", msg.ids[1:])
            router.send_multipart([who, *wire.encode(reply)])
            if isinstance(msg, wire.Cancel):
                return

    thread = threading.Thread(target=daemon, daemon=True)
    thread.start()
    answers = []
    with Client(endpoint) as client:
        for answer in client.submit([f"/p/{i}.jpg" for i in range(5)],
                                    interrupts=lambda: presses[0]):
            answers.append(answer)
            if answer.path == "/p/1.jpg":
                presses[0] = 2                 # the second Ctrl-C
    thread.join(5)
    router.close(0)
    assert [(a.path, a.status) for a in answers] == [
        ("/p/2.jpg", CANCELLED), ("/p/3.jpg", CANCELLED), ("/p/4.jpg", CANCELLED),
        ("/p/1.jpg", CANCELLED), ("/p/0.jpg", "error")], answers
    assert "interrupted while running" in answers[-1].error
    assert [type(m).__name__ for m in seen] == ["StatusQuery", "Submit", "Cancel"]
    assert len(seen[1].requests) == 2 and seen[2].ids == tuple(r.id for r in seen[1].requests)


def test_a_name_that_is_not_utf8_is_refused_alone_and_a_link_loop_sent_once(
        tiny_models, photo_files, tmp_path, daemons):
    """An old archive's Latin-1 name (b"caf\\xe9.jpg") and a link back up the tree: `submit
    -r` answered a traceback and sent nothing, the link loop sent one photo 41 times, and
    the same name dropped in a watched folder ended the daemon (exit 1, and again at every
    start). Now that one file is refused with the fix, the others are answered once each,
    and the watching daemon records the refusal and serves on."""
    photos, watched, out = tmp_path / "photos", tmp_path / "inbox", tmp_path / "masks"
    (photos / "sub").mkdir(parents=True)
    watched.mkdir()
    shutil.copy(photo_files[0], photos / "good.jpg")
    latin1 = os.fsencode(photos) + b"/caf\xe9.jpg"
    shutil.copy(photo_files[1], latin1)
    (photos / "sub" / "up").symlink_to("..")               # a loop: sub/up/sub/up/...
    daemon = daemons(tiny_models["logits"], out, tmp_path, "--batch-size", "4",
                     "--preprocess-workers", "1", "--postprocess-workers", "1",
                     "--watch", str(watched))
    try:
        daemon.wait_ready()
        done = subprocess.run(
            [sys.executable, "-m", "pspnet", "submit", str(photos), "-r",
             "--endpoint", daemon.endpoint], capture_output=True, timeout=120)
        shutil.copy(photo_files[0], watched / "good.jpg")
        shutil.copy(photo_files[1], os.fsencode(watched) + b"/caf\xe9.jpg")
        deadline = time.monotonic() + 60
        while len(from_watch := [e for e in watch_record(out) if e.get("final")]) < 2:
            assert time.monotonic() < deadline, watch_record(out)
            assert daemon.proc.poll() is None, daemon.tail()
            time.sleep(0.2)
        assert daemon.proc.poll() is None, daemon.tail()
    finally:
        assert daemon.stop() == 0, daemon.logs()
    assert b"Traceback" not in done.stderr, done.stderr.decode(errors="replace")
    assert done.returncode == 1, done.stderr                   # one failed request
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [d["status"] for d in lines] == ["error", "ok"], lines
    assert lines[0]["error"].startswith("file name is not UTF-8: ") and \
        "caf\\xe9.jpg; rename it to UTF-8" in lines[0]["error"], lines[0]
    assert lines[1]["path"] == str(photos / "good.jpg")        # once, not once per loop
    by_status = sorted((e["status"], e.get("error") or "") for e in from_watch)
    assert by_status[0] == ("error", by_status[0][1]) and "not UTF-8" in by_status[0][1]
    assert by_status[1] == ("ok", "")


def test_the_client_takes_no_orders_about_requests_it_never_sent() -> None:
    """Whatever answers at the endpoint may not be the daemon: a status whose `daemon` is
    not a map, and error and busy replies naming ids this submit never sent (or not yet),
    crashed the client (AttributeError, KeyError) or queued a request twice. Now they are
    passed over; a reply about what was sent still counts."""
    from pspnet.daemon.client import _Submission

    run = _Submission(None, [wire.Request(f"p-{i}", f"/x/{i}.jpg") for i in range(3)])
    first = run.to_send.popleft()                       # sent, not yet acknowledged
    run.sent_at[first.id] = time.monotonic()
    run.unacked.add(first.id)
    assert list(run.handle(wire.Reply("status", body={"daemon": [1, 2]}))) == []
    assert run.daemon_pid is None
    assert list(run.handle(wire.Reply("error", ids=("p-1", "nobody"), message="x"))) == []
    assert list(run.handle(wire.Reply("busy", ids=("p-2", "p-2", "nobody")))) == []
    assert [r.id for r in run.to_send] == ["p-1", "p-2"] and run.open_ids == {"p-0", "p-1",
                                                                              "p-2"}
    [answer] = run.handle(wire.Reply("error", ids=("p-0",), message="refused"))
    assert (answer.id, answer.status, answer.error) == ("p-0", wire.ERROR, "refused")
