"""Issue 26, part 1: a live model reload. `pspnet reload` (and SIGHUP) swap the daemon's
model under a stream of requests: none lost, none an error, every answer names the model
that made it, and none made by the replaced model once the reload has returned. A model
that cannot start, or has other classes, is refused; the old one serves on.

Model B is a second build of the tiny test model at another input size and batch sizes
(96x96, 1 and 4): its manifest, so its version, differs from A's (64x64, 1/4/16)."""

from __future__ import annotations

import collections
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pspnet.daemon.client import Client, ReloadFailed
from pspnet.model.manifest import model_version
from tests.kit import Submitter, linked_stream, watch_record


@pytest.fixture(scope="module")
def model_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_model import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("model_b"), batch_sizes=(1, 4),
                               input_size=(96, 96))


def poison(model: Path) -> None:
    """The first convolution's weights set to NaN in every ONNX file: the model loads,
    and every logit it computes is NaN (a bad weights file)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    for path in model.glob("*.onnx"):
        graph = onnx.load(str(path))
        weight = next(i for i in graph.graph.initializer if len(i.dims) == 4)
        nan = np.full(tuple(weight.dims), np.nan, np.float32)
        weight.CopyFrom(numpy_helper.from_array(nan, weight.name))
        onnx.save(graph, str(path))


def wait_model(daemon, version: str, reloads: int, timeout_s: float = 60) -> dict:
    """The status once the daemon serves `version` after `reloads` reloads, the old gone."""
    deadline = time.monotonic() + timeout_s
    while True:
        model = daemon.status()["model"]
        if model["version"] == version and model["reloads"] == reloads \
                and model["reload"] is None:
            return model
        assert time.monotonic() < deadline, model
        time.sleep(0.1)


class Stream(threading.Thread):
    """A client that keeps sending WINDOW requests at a time until told to stop (and at
    least `least` in all), so requests are sent before, during and after each reload;
    each window kept with when it was sent and when its last answer came."""

    def __init__(self, endpoint: str, paths: list[Path], least: int) -> None:
        super().__init__(daemon=True)
        self.endpoint, self.paths, self.least = endpoint, paths, least
        self.windows: list[tuple[float, float, list]] = []     # sent, done, answers
        self.stop, self.error = threading.Event(), None

    def run(self) -> None:
        sent = 0
        try:
            with Client(self.endpoint) as client:
                while not self.stop.is_set() or sent < self.least:
                    paths = [self.paths[(sent + i) % len(self.paths)] for i in range(WINDOW)]
                    began = time.monotonic()
                    answers = list(client.submit(paths))
                    self.windows.append((began, time.monotonic(), answers))
                    sent += WINDOW
        except BaseException as exc:  # the test reads it
            self.error = exc


WINDOW = 6


@pytest.fixture(scope="module")
def model_b_same_size(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Other weights (seed 1) and batch sizes (1, 4) at A's input size: the same geometry
    and classes, so a reload to it starts new executors only."""
    from tests.tiny_model import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("model_b_same"), batch_sizes=(1, 4),
                               input_size=(64, 64), seed=1)


@pytest.mark.parametrize("kind", ["other-size", "same-size"])
def test_reload_a_b_a_b_under_a_stream(tiny_models, model_b, model_b_same_size, photo_files,
                                       tmp_path, daemons, kind):
    """Two clients stream (6 requests at a time each, at least 2 x 150) and 3 x 10 images
    land in a watched folder while the model goes A -> B -> A -> B: every answer ok and
    named, both models answered, and no request sent after a reload returned answered by
    the model it replaced (unless a later reload had switched back to it); every watched
    image recorded ok once, with its model; at the end only B's workers are left. B at
    another input size: every stage starts anew at each reload; B of the same size:
    executors only, the preprocess and postprocess workers serve on."""
    model_a = tiny_models["logits"]
    model_b = model_b if kind == "other-size" else model_b_same_size
    versions = {model_version(model_a): "A", model_version(model_b): "B"}
    assert len(versions) == 2
    watched = tmp_path / "watched"
    watched.mkdir()
    daemon = daemons(model_a, tmp_path / "masks", tmp_path, "--batch-size", "4",
                     "--max-wait-ms", "5", "--watch", str(watched))
    daemon.wait_ready()
    jobs = [Stream(daemon.endpoint, linked_stream(photo_files, tmp_path / f"in{i}", 150,
                                                  prefix=f"c{i}"), 150)
            for i in range(2)]
    for job in jobs:
        job.start()
    served = [(0.0, model_version(model_a))]        # (when a reload returned, its model)
    with Client(daemon.endpoint) as client:
        for step, model in enumerate((model_b, model_a, model_b)):
            deadline = time.monotonic() + 120
            while len(jobs[0].windows) < 3 * (step + 1):      # some answers in between
                assert time.monotonic() < deadline and jobs[0].error is None, jobs[0].error
                time.sleep(0.02)
            for i in range(10):             # the watched folder fills across the reload
                shutil.copy(photo_files[100 + 10 * step + i], watched / f"w{step}-{i}.jpg")
            body = client.reload(model)
            served.append((time.monotonic(), body["version"]))
            assert body["version"] == model_version(model), body
    for job in jobs:
        job.stop.set()
        job.join(180)
        assert not job.is_alive() and job.error is None, job.error
    windows = [w for job in jobs for w in job.windows]
    answers = [a for _, _, window in windows for a in window]
    assert len(answers) == WINDOW * len(windows) >= 300
    assert collections.Counter(a.status for a in answers) == {"ok": len(answers)}, \
        [a.error for a in answers if a.status != "ok"][:3]
    assert all(a.model in versions for a in answers)
    per_model = collections.Counter(versions[a.model] for a in answers)
    assert set(per_model) == {"A", "B"}, per_model
    late = []       # the model served when a window was sent, or one a reload switched to
    for began, done, window in windows:                     # before its answers came
        allowed = {[v for t, v in served if t <= began][-1]} | \
            {v for t, v in served if began < t <= done + 1.0}
        late += [a for a in window if a.model not in allowed]
    assert not late, late[:3]
    wait_model(daemon, model_version(model_b), 3)    # the last replaced model gone too
    deadline = time.monotonic() + 60
    while len(watch_record(tmp_path / "masks")) < 30 and time.monotonic() < deadline:
        time.sleep(0.1)
    record = watch_record(tmp_path / "masks")
    assert sorted(e["name"] for e in record) == sorted(f"w{s}-{i}.jpg" for s in range(3)
                                                       for i in range(10))
    assert {e["status"] for e in record} == {"ok"} and {e["model"] for e in record} <= \
        set(versions), record
    status = daemon.status()
    assert status["model"]["reloads"] == 3 and status["ready"]
    assert status["front"]["errors"] == 0
    assert status["front"]["ok"] == len(answers) + 30
    started = [e for e in daemon.events() if e.get("event") == "child started"]
    retired = [e for e in daemon.events() if e.get("event") == "child retired"]
    anew = 3 if kind == "other-size" else 1         # every stage, or the executor only
    assert len(retired) == 3 * anew, retired        # each reload: the old ones retired
    assert len(started) == 3 + 3 * anew             # and no restart
    assert {e["child"].split("-")[0] for e in retired} == \
        ({"preprocess", "executor", "postprocess"} if anew == 3 else {"executor"})
    assert not [e for e in daemon.events() if e.get("event") == "child died"]
    print(f"FIGURE reload A-B-A-B under two streams: {len(answers)} ok, per model "
          f"{dict(per_model)}, 0 late")
    assert daemon.stop() == 0, daemon.tail()


def test_broken_or_other_classes_refused_old_serves_on(tiny_models, model_b, photo_files,
                                                       tmp_path, daemons):
    """A model directory whose ONNX files are garbage: `pspnet reload` exits 1 naming the
    executor's reason, the old model serves on through it (a stream of 120: 0 lost, 0
    errors, all named A). One that loads but whose first batch gives NaN logits is refused
    likewise. A model that names its classes otherwise is refused at once unless --force.
    Then SIGHUP reloads the served directory, live; a stop while a model loads gives it
    up and tells the client that asked."""
    model_a = tiny_models["logits"]
    version_a = model_version(model_a)
    broken = tmp_path / "broken"
    shutil.copytree(model_b, broken)
    for onnx in broken.glob("*.onnx"):
        onnx.write_bytes(b"not an onnx file" * 64)
    poisoned = tmp_path / "poisoned"
    shutil.copytree(model_b, poisoned)
    poison(poisoned)
    renamed = tmp_path / "renamed"
    shutil.copytree(model_a, renamed)
    manifest = json.loads((renamed / "manifest.json").read_text())
    manifest["class_names"][15] = "pedestrian"
    (renamed / "manifest.json").write_text(json.dumps(manifest))

    daemon = daemons(model_a, tmp_path / "masks", tmp_path, "--batch-size", "4")
    daemon.wait_ready()
    job = Submitter(daemon.endpoint, linked_stream(photo_files, tmp_path / "in", 120))
    job.start()
    job.wait_for(10)
    cli = [sys.executable, "-m", "pspnet", "reload", "--endpoint", daemon.endpoint]
    run = subprocess.run([*cli, "--model", str(broken)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 1, run
    assert "executor-" in run.stderr and "cannot start" in run.stderr, run.stderr
    assert "serves on" in run.stderr and run.stdout == ""
    with Client(daemon.endpoint) as client:
        with pytest.raises(ReloadFailed, match="first batch failed: .*not finite"):
            client.reload(poisoned)
        with pytest.raises(ReloadFailed, match="pass --force"):
            client.reload(renamed)
        checkpoint = tmp_path / "weights.pth"
        checkpoint.write_bytes(b"\0" * 64)
        with pytest.raises(ReloadFailed, match="is a checkpoint, not a model directory: "
                                               "make one with `pspnet build"):
            client.reload(checkpoint)
    job.join(120)
    assert job.error is None and len(job.answers) == 120
    assert collections.Counter(a.status for a in job.answers) == {"ok": 120}
    assert {a.model for a in job.answers} == {version_a}
    model = wait_model(daemon, version_a, 0)       # the failed model's workers gone
    assert model["failed_reloads"] == 2 and not model["last_reload"]["ok"]
    assert model["refused_reloads"] == 2             # counted apart from images:
    assert daemon.status()["daemon"]["refused"] == 0  # no image was refused

    run = subprocess.run([*cli, "--model", str(renamed), "--force"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    forced = json.loads(run.stdout)
    assert forced["previous"] == version_a and forced["version"] == model_version(renamed)
    wait_model(daemon, forced["version"], 1)

    daemon.signal(signal.SIGHUP)                # the same directory, read again, live
    model = wait_model(daemon, forced["version"], 2)
    assert model["dir"] == str(renamed)
    with Client(daemon.endpoint) as client:
        answers = list(client.submit(photo_files[:8]))
    assert [a.status for a in answers] == ["ok"] * 8
    assert {a.model for a in answers} == {forced["version"]}
    assert {c[1] for a in answers for c in a.found} <= set(manifest["class_names"])
    assert daemon.proc.poll() is None

    outcome: list[BaseException] = []           # a stop while a model loads: given up,
    asker = threading.Thread(target=ask_reload, args=(daemon.endpoint, renamed, outcome))
    asker.start()                               # and the client that asked told why
    deadline = time.monotonic() + 30
    while (status := daemon.status())["model"]["reload"] is None:
        assert time.monotonic() < deadline and asker.is_alive(), outcome
        time.sleep(0.02)
    assert status["ready"], status          # a model loading beside it: still ready
    assert status["model"]["reload"]["state"] == "loading"
    assert daemon.stop() == 0, daemon.tail()
    asker.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], ReloadFailed), outcome
    assert "shutting down" in str(outcome[0])


def ask_reload(endpoint: str, model: Path, outcome: list[BaseException]) -> None:
    try:
        with Client(endpoint) as client:
            client.reload(model, timeout_s=60)
    except BaseException as exc:  # the test reads it
        outcome.append(exc)


def test_classes_are_compared_by_number_and_name(tiny_models):
    from dataclasses import replace

    from pspnet.daemon.reload import classes_problem
    from pspnet.model.manifest import Manifest

    running = Manifest.read(tiny_models["logits"])
    assert classes_problem(running, running) is None
    assert classes_problem(running, replace(running, head="labels")) is None
    fewer = replace(running, num_classes=20, class_names=running.class_names[:20])
    assert classes_problem(running, fewer) == "has 20 classes, the running model 21"
    names = (*running.class_names[:15], "pedestrian", *running.class_names[16:])
    assert "names class 15 'pedestrian'" in classes_problem(running,
                                                            replace(running, class_names=names))


class Exited:
    """A worker process that has exited with `code` (what the supervisor reaps)."""

    def __init__(self, pid: int, code: int) -> None:
        self.pid, self.code = pid, code

    def poll(self) -> int:
        return self.code


def test_the_supervisor_fails_a_reload_not_the_daemon_and_retires_without_restarts(
        tmp_path):
    """A worker of the generation a reload starts that cannot start records the reload's
    failure (no CannotStart: the daemon serves on) and is not restarted; a retired worker
    is dropped once reaped, never restarted; one of the serving model that cannot start
    still stops the daemon, as before reloads."""
    from pspnet.core.config import PipelineConfig
    from pspnet.core.exits import EXIT_CANNOT_START
    from pspnet.daemon.supervisor import CannotStart, Slot, Supervisor

    supervisor = Supervisor(PipelineConfig(model_dir=tmp_path, preprocess_workers=1,
                                           postprocess_workers=1), "{}")
    supervisor.trial = 1
    supervisor.slots = [Slot("executor", 0, proc=Exited(10, 0), started=1.0, heard=1.0),
                        Slot("executor", 1, proc=Exited(11, EXIT_CANNOT_START), started=1.0,
                             generation=1, fatal="ort backend on cpu: bad model")]
    supervisor.slots[0].retiring = True
    deaths = supervisor.check(2.0)
    assert [(d.slot.label, d.retired) for d in deaths] == [("executor-0", True),
                                                           ("executor-1", True)]
    assert supervisor.slots == [] and supervisor.restarts == 0
    assert supervisor.trial_failures == {1: "executor-1 cannot start: ort backend on cpu: "
                                            "bad model"}
    supervisor.trial = None
    supervisor.slots = [Slot("executor", 0, proc=Exited(12, EXIT_CANNOT_START), started=1.0)]
    with pytest.raises(CannotStart, match="executor-0 cannot start"):
        supervisor.check(3.0)


def test_eval_through_the_daemon_runs_on_across_a_reload(tiny_models, model_b, photos,
                                                         tmp_path, daemons):
    """`pspnet eval --endpoint` over 180 images while the daemon swaps A for B (a simulated
    device at 15 images/s, so the reload lands mid-run): every image scored, none failed,
    and the report counts the masks of each model."""
    from pspnet.cli import main
    from tests.voc_folder import make_voc_folder

    voc = make_voc_folder(tmp_path / "voc", photos=[(f"{i}_{name}", rgb) for i in range(20)
                                                    for name, rgb in photos])
    daemon = daemons(tiny_models["logits"], tmp_path / "daemon-masks", tmp_path,
                     "--batch-size", "4", "--backend-option", "img_s=15", backend="sim")
    daemon.wait_ready()
    report = tmp_path / "eval.json"
    codes: list[int] = []
    runner = threading.Thread(target=lambda: codes.append(main([
        "eval", "--voc", str(voc.root), "--model", str(tiny_models["logits"]),
        "--endpoint", daemon.endpoint, "--json", str(report)])))
    runner.start()
    deadline = time.monotonic() + 60
    while daemon.status()["front"]["ok"] < 10:
        assert time.monotonic() < deadline and runner.is_alive()
        time.sleep(0.05)
    with Client(daemon.endpoint) as client:
        body = client.reload(model_b)
    runner.join(120)
    assert codes == [0]
    doc = json.loads(report.read_text())
    assert doc["images"] == len(voc.images) == 180 and doc["failed"] == []
    assert doc["models"].keys() == {model_version(tiny_models["logits"]), body["version"]}
    assert sum(doc["models"].values()) == 180
    assert daemon.stop() == 0, daemon.tail()
