"""Issue 7.1: the bad-input corpus through a running daemon.

Every kind of tests/bad_images.py (missing, directory, zero bytes, truncated, random bytes
named .jpg, PNG named .jpg, grayscale, CMYK, progressive, 1x1, a 20000x20000 header...),
plus: a real, fully decodable 20000x20000 PNG and a real photo over a configured
--max-pixels (both refused from the header: the preprocess workers never grow), a FIFO
named .jpg, a file the daemon may not read (the daemon runs without root's permission
override, as CI runs as root), paths outside --allow-root (plain, via `..`, via a symlink
inside the root, a ground truth outside), a relative path, and ground truths that are
wrong (size, RGB, missing). Each is answered once, with its own clear error or a correct
mask; the daemon never exits and no worker dies; the counts show in `pspnet status`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pspnet.core import wire
from pspnet.daemon.server import check_exposure
from tests.bad_images import EXPECT, HUGE_SIDE, write_corpus
from tests.kit import RawClient, mask_pixels, permissions_apply_to_daemon, proc_kb

MAX_PIXELS = 250_000         # configured for this daemon: the corpus photo (135 kpx) fits
PREPROCESS_BOUND_MB = 400    # decoding a 20000x20000 image would need 1,200 MB

# The stage that must refuse each error kind ("front": refused at the door).
DOOR = "front"


def build_cases(tmp: Path, photo: Path) -> tuple[dict[str, tuple[str, str | None, str | None]],
                                                  Path]:
    """kind -> (path, ann, expected error substring or None for success); the root."""
    root = tmp / "allowed"
    corpus = write_corpus(root / "corpus")
    cases: dict[str, tuple[str, str | None, str | None]] = {
        kind: (str(corpus[kind]), None, EXPECT[kind]) for kind in EXPECT}
    # 2 Mpx in one row: over this daemon's 0.25 Mpx before its side is looked at
    # (tests/stages/test_image_io.py checks the side's refusal at the default limit)
    cases["wide_png"] = (str(corpus["wide_png"]), None, "(--max-pixels of pspnet serve")
    # a real 20000x20000 image: 1-bit PNG, 50 MB in memory here, 1.2 GB as RGB
    real_huge = root / "real_20000x20000.png"
    Image.new("1", (HUGE_SIDE, HUGE_SIDE), 1).save(real_huge, optimize=False)
    cases["real_20000x20000_png"] = (str(real_huge), None, "over the 0.2 Mpx limit")
    over = root / "over_limit_real.jpg"
    Image.fromarray(np.full((500, 600, 3), 90, np.uint8)).save(over, quality=90)
    cases["over_max_pixels_real"] = (str(over), None, "(--max-pixels of pspnet serve")
    fifo = root / "fifo.jpg"
    os.mkfifo(fifo)
    cases["fifo_named_jpg"] = (str(fifo), None, "not a regular file")
    # the input roots
    outside = tmp / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(photo.read_bytes())
    (root / "link_out.jpg").symlink_to(outside / "secret.jpg")
    cases["outside_root"] = (str(outside / "secret.jpg"), None, "outside the allowed input roots")
    cases["dotdot_escape"] = (f"{root}/../outside/secret.jpg", None,
                              "outside the allowed input roots")
    cases["symlink_escape"] = (str(root / "link_out.jpg"), None,
                               "outside the allowed input roots")
    cases["gt_outside_root"] = (str(corpus["good_jpeg"]), str(outside / "secret.jpg"),
                                "outside the allowed input roots")
    cases["relative_path"] = ("corpus/good_jpeg.jpg", None, "paths must be absolute")
    cases["system_file"] = ("/etc/passwd", None, "outside the allowed input roots")
    # ground truths
    good = str(corpus["good_jpeg"])
    cases["gt_good"] = (good, str(corpus["gt_good"]), None)
    cases["gt_wrong_size"] = (good, str(corpus["gt_wrong_size"]), "wrong size")
    cases["gt_rgb"] = (good, str(corpus["gt_rgb"]), "expected a palette")
    cases["gt_missing"] = (good, str(corpus["gt_missing"]), "no such file")
    return cases, root


def test_every_bad_input_answered_daemon_keeps_running(tiny_models, photo_files, tmp_path,
                                                       daemons):
    cases, root = build_cases(tmp_path, photo_files[0])
    unreadable_applies = permissions_apply_to_daemon()
    if not unreadable_applies:                   # root without CAP_SETPCAP: root reads it
        cases["unreadable"] = (cases["unreadable"][0], None, None)
    daemon = daemons(tiny_models["logits"], tmp_path / "masks", tmp_path, "--batch-size", "4",
                     "--max-pixels", str(MAX_PIXELS), "--allow-root", str(root),
                     drop_dac=True)
    started = time.monotonic()
    try:
        daemon.wait_ready()
        client = RawClient(daemon.endpoint)
        client.offer([wire.Request(kind, path, ann) for kind, (path, ann, _) in cases.items()])
        client.run_until(lambda c: c.answered == len(cases), timeout_s=120)
        client.pump(300)
        time.sleep(1.5)             # per-stage counters come with each worker's heartbeat
        status = daemon.status()
        assert daemon.proc.poll() is None
        # the same counts through the command line
        cli = subprocess.run([sys.executable, "-m", "pspnet", "status", "--endpoint",
                              daemon.endpoint], capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        cli_status = json.loads(cli.stdout)
        prep_peak = max(proc_kb(pid, "VmHWM") for pid in status["stages"]["preprocess"]["pids"])
        client.close()
    finally:
        assert daemon.stop() == 0, daemon.logs()

    assert set(client.result_count) == set(cases)
    assert set(client.result_count.values()) == {1}, "a request was answered twice"
    table = []
    for kind, (_path, ann, expect) in cases.items():
        result = client.results[kind]
        table.append(f"{kind:>22}: {result.status:5} [{result.stage}] {result.error or ''}")
        if expect is None:
            assert result.status == wire.OK, (kind, result.error)
            with Image.open(cases[kind][0]) as original:
                mask_pixels(result.mask, size=original.size)
            assert (result.areas is not None) == (ann is not None)
        else:
            assert result.status == wire.ERROR, (kind, result.mask)
            assert expect in result.error, (kind, result.error)
            assert len(result.error.splitlines()) == 1 and len(result.error) < 300
    print("\n" + "\n".join(table))

    errors = {k: r for k, r in client.results.items() if r.status == wire.ERROR}
    by_stage = {s: sum(r.stage == s for r in errors.values())
                for s in (DOOR, "preprocess", "postprocess")}
    assert set(r.stage for r in errors.values()) <= set(by_stage)
    for doc in (status, cli_status):
        assert doc["daemon"]["refused"] == by_stage[DOOR]
        assert doc["front"]["errors"] == by_stage["preprocess"] + by_stage["postprocess"]
        assert doc["front"]["ok"] == len(cases) - len(errors)
        assert doc["stages"]["preprocess"]["errors"] == by_stage["preprocess"]
        assert doc["stages"]["postprocess"]["errors"] == by_stage["postprocess"]
        assert doc["front"]["restarts"] == 0, "a worker died on a bad input"
        assert all(s["alive"] == s["processes"] for s in doc["stages"].values())
    assert status["metrics"]["images"] == 1          # gt_good only
    assert prep_peak / 1024 < PREPROCESS_BOUND_MB, "an oversized image was decoded"
    print(f"FIGURE bad input: {len(cases)} kinds tried, {len(client.result_count)} answered "
          f"once ({len(cases) - len(errors)} ok, {by_stage[DOOR]} refused at the door, "
          f"{by_stage['preprocess']} by preprocess, {by_stage['postprocess']} by "
          f"postprocess); unreadable enforced: {unreadable_applies}; preprocess peak "
          f"{prep_peak / 1024:.0f} MB (a decoded 20000x20000 would be 1,200 MB); "
          f"daemon alive, 0 restarts; {time.monotonic() - started:.1f} s")


@pytest.mark.parametrize(("endpoint", "exposed"), [
    ("ipc:///run/x", False), ("tcp://127.0.0.1:5555", False), ("tcp://[::1]:5555", False),
    ("tcp://localhost:5555", False), ("tcp://0.0.0.0:5555", True), ("tcp://*:5555", True),
    ("tcp://[::]:5555", True), ("tcp://10.1.2.3:5555", True), ("tcp://eth0:5555", True),
    ("tcp://127.1:5555", True),           # not parsed as loopback: refused, on the safe side
])
def test_only_local_endpoints_may_skip_allow_root(endpoint, exposed):
    assert (check_exposure(endpoint, ()) is not None) == exposed
    assert check_exposure(endpoint, (Path("/data"),)) is None


@pytest.mark.parametrize("endpoint", ["tcp://*:5998", "tcp://0.0.0.0:5999"])
def test_exposed_endpoint_without_allow_root_refused_at_start(tiny_models, endpoint):
    out = subprocess.run([sys.executable, "-m", "pspnet", "serve", "--model",
                          str(tiny_models["logits"]), "--endpoint", endpoint],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--allow-root" in out.stderr, out.stderr
