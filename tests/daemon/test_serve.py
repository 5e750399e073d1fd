"""Issue 4: the daemon as users run it: serve, submit and status on 50 photos, two local
executors and a remote one over tcp, a worker that cannot start (exit 3, no restart loop),
bad arguments refused in one line.

Crashes, signals and watch mode under kill -9 are in tests/reliability/."""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pspnet.core.keys import write_keys
from tests.kit import Submitter, mask_pixels


def test_serve_submit_status_50_images(tiny_models, photo_files, tmp_path, daemons):
    daemon = daemons(tiny_models["logits"], tmp_path / "masks", tmp_path, "--batch-size", "4")
    try:
        status = daemon.wait_ready()
        assert status["stages"]["executor"]["alive"] == 1
        job = Submitter(daemon.endpoint, photo_files[:50])
        job.run()
        assert job.error is None
        ids = collections.Counter(a.id for a in job.answers)
        assert len(ids) == 50 and set(ids.values()) == {1}
        assert all(a.status == "ok" for a in job.answers)
        for a in job.answers:
            mask_pixels(a.mask)
        status = daemon.status()
        assert status["front"]["ok"] == 50
        # no worker flags: the plan for this host's CPUs, shown in the status
        assert status["plan"]["set_by_flags"] == [] and status["plan"]["cpus"] >= 1
        assert status["stages"]["preprocess"]["alive"] == status["plan"]["preprocess_workers"]
        assert status["stages"]["postprocess"]["alive"] == \
            status["plan"]["postprocess_workers"]
        # the command-line client: one JSON line per image, exit 0 only if all succeeded
        cli = subprocess.run(
            [sys.executable, "-m", "pspnet", "submit", str(photo_files[0]),
             str(tmp_path / "nope.jpg"), "--endpoint", daemon.endpoint],
            capture_output=True, text=True, timeout=60)
        lines = [json.loads(line) for line in cli.stdout.splitlines()]
        assert cli.returncode == 1
        assert sorted(line["status"] for line in lines) == ["error", "ok"]
        assert {"id", "path", "status", "mask", "error", "latency_ms"} <= set(lines[0])
        st = subprocess.run([sys.executable, "-m", "pspnet", "status", "--endpoint",
                             daemon.endpoint], capture_output=True, text=True, timeout=30)
        doc = json.loads(st.stdout)
        assert doc["front"]["ok"] == 51 and "images_per_s" in doc
        assert doc["plan"] == status["plan"]
    finally:
        assert daemon.stop() == 0, daemon.logs()
    # the executor says how long its backend took to open (a compile's share: none here)
    (opened,) = [e for e in daemon.events() if e.get("event") == "backend open"]
    assert opened["backend"] == "ort" and opened["batch"] == 4
    assert opened["backend_open_s"] > 0 and "compile_s" not in opened
    (plan,) = [e for e in daemon.events() if e.get("event") == "plan"]
    # what runs and how it was chosen, then the workers
    assert plan["plan"].startswith("ort fp32 on cpu (--backend ort; --precision auto: fp32); "
                                   f"{status['plan']['preprocess_workers']} preprocess + ")


def test_two_executors_over_tcp_loopback_and_a_remote_one(tiny_models, photo_files, tmp_path,
                                                          daemons):
    """--devices cpu,cpu starts two executors; `pspnet worker` joins a third from outside,
    at the address --tcp-host gave (127.0.0.2 stands in for a LAN address: before that flag
    the internal ports were on 127.0.0.1 only, and no other host could join)."""
    port = 20000 + os.getpid() % 20000
    model = tiny_models["labels"]
    daemon = daemons(model, tmp_path / "masks", tmp_path,
                     "--devices", "cpu,cpu", "--transport", "tcp", "--tcp-host", "127.0.0.2",
                     "--tcp-base-port", str(port + 1), "--batch-size", "4", "--max-wait-ms",
                     "5", endpoint=f"tcp://127.0.0.1:{port}")
    remote = subprocess.Popen(
        [sys.executable, "-m", "pspnet", "worker", "executor", "--front", "127.0.0.2",
         "--tcp-base-port", str(port + 1), "--model", str(model), "--batch-size", "4",
         "--max-wait-ms", "5", "--index", "100", "--log-format", "json",
         "--keys", os.environ["PSPNET_KEYS"]],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stranger = tmp_path / "stranger-keys"     # its own worker key, the daemon's server.key
    write_keys(stranger)
    shutil.copy(Path(os.environ["PSPNET_KEYS"]) / "server.key", stranger / "server.key")
    refused = subprocess.Popen(
        [sys.executable, "-m", "pspnet", "worker", "executor", "--front", "127.0.0.2",
         "--tcp-base-port", str(port + 1), "--model", str(model), "--batch-size", "4",
         "--index", "101", "--log-format", "json", "--keys", str(stranger)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        daemon.wait_ready()
        deadline = time.monotonic() + 60
        while not daemon.status()["remote"] and time.monotonic() < deadline:
            time.sleep(0.2)
        job = Submitter(daemon.endpoint, photo_files[:60])
        job.run()
        assert sorted(a.status for a in job.answers) == ["ok"] * 60
        time.sleep(1.5)                                   # one more heartbeat
        status = daemon.status()
        executors = status["stages"]["executor"]
        assert executors["processes"] == 2 and executors["alive"] == 2
        (joined,) = [r for r in status["remote"] if r["stage"] == "executor"]
        print(f"local executors {executors['processed']} images, remote {joined['processed']}")
        assert joined["processed"] > 0 and executors["processed"] > 0
        assert executors["processed"] + joined["processed"] == 60
        # the worker with another key is refused at the handshake: it says so and exits
        _, err = refused.communicate(timeout=60)
        assert refused.returncode == 1, err
        assert "cannot reach the front" in err and "refused our key" in err, err
        assert [r["index"] for r in status["remote"]] == [100]
    finally:
        remote.kill()
        refused.kill()
        assert daemon.stop() == 0, daemon.logs()


def test_cannot_start_is_its_own_exit_status_not_a_restart_loop(tiny_models, tmp_path,
                                                                daemons):
    """A backend that cannot load makes `serve` exit 3 with the reason in the log."""
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_models["logits"], broken)
    for onnx in broken.glob("*.onnx"):
        onnx.write_bytes(b"not a model")
    daemon = daemons(broken, tmp_path / "masks", tmp_path, "--batch-size", "4")
    code = daemon.proc.wait(120)
    assert code == 3, daemon.logs()
    events = daemon.events()
    assert any(e.get("event") == "cannot start" and "executor" in str(e.get("error"))
               for e in events), daemon.logs()
    assert sum(e.get("event") == "child started" and e.get("child") == "executor-0"
               for e in events) == 1, "restarted a child that cannot start"
