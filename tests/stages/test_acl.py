"""The acl backend against the aclruntime stand-in (tests/fake_aclruntime), both releases.

The stand-in behaves as the real module does where the backend depends on it: the GIL held
through `run`, ACL's per-thread context (which `run` does not bind on 2023 wheels), the
2024+ path and log-level rules, the real Tensor's properties. The first tests are the
issue's points 1, 2, 4 and 6 (issue 22): each failed on the in-process backend of 513dc9e.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pspnet.model.manifest import Manifest
from pspnet.stages.backends import NUM_SLOTS, BackendUnavailable, open_backend
from pspnet.stages.backends.acl import exec_times_ms
from tests.kit import with_om
from tests.stages.test_backends import (
    BATCH,
    SIZE,
    assert_matches,
    reference,
    run_like_the_executor,
)
from tests.tiny_model import random_batch

RELEASES = ("2023", "2025", "newest")


def open_acl(model_dir: Path, batch: int = BATCH, **kwargs):
    kwargs.setdefault("precision", "fp32")          # with_om's OMs: fp32, as the stand-in
    return open_backend("acl", model_dir, batch, device="npu:0", **kwargs)


def timed_uploads(backend, batches, fill_s: float):
    """run_like_the_executor, where the images of each batch take `fill_s` to arrive (the
    assembling thread waits that long before its upload), with the span of each `upload`."""
    spans: dict[int, tuple[float, float]] = {}
    upload = backend.upload

    def timed(slot, images, boxes):
        time.sleep(fill_s)
        start = time.monotonic()
        upload(slot, images, boxes)
        spans[len(spans)] = (start, time.monotonic())

    backend.upload = timed
    results = run_like_the_executor(backend, batches)
    return results, [spans[k] for k in range(len(batches))]


@contextlib.contextmanager
def beating(interval_s: float) -> Iterator[list[float]]:
    """A thread that notes the time every `interval_s`, like the executor's heartbeat."""
    beats: list[float] = []
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            beats.append(time.monotonic())
            time.sleep(interval_s)

    thread = threading.Thread(target=beat)
    thread.start()
    try:
        yield beats
    finally:
        stop.set()
        thread.join()


# ---- issue 22, points 1, 2, 4, 6 ---------------------------------------------------------

def test_upload_of_the_next_batch_runs_during_execute(fake_acl, tiny_models, references,
                                                      tmp_path):
    """Point 1: while batch k executes (holding the GIL, as aclmdlExecute does), the
    executor's thread fills and uploads batch k+1. In-process, upload(k+1) needed the GIL
    and the bindings that run(k) held: it ended only after run(k)."""
    fake_acl.configure(execute_ms=500)
    backend = open_acl(with_om(tiny_models["logits"], tmp_path))
    batches = [random_batch(BATCH, SIZE, seed=10 + k) for k in range(4)]
    # batch k+1's images arrive 150 ms into batch k's 500 ms execute
    results, uploads = timed_uploads(backend, batches, fill_s=0.15)
    runs = fake_acl.events("run")
    backend.close()
    assert len(runs) == len(batches)
    for k in range(len(batches) - 1):
        assert uploads[k + 1][1] < runs[k]["end"], \
            f"upload of batch {k + 1} waited for the execute of batch {k}"
        assert runs[k]["start"] < uploads[k + 1][0], (k, uploads, runs)
    for k, (images, boxes) in enumerate(batches):
        assert_matches("logits", results[k], reference(references["logits"], images, boxes))


def test_heartbeat_keeps_beating_during_a_long_execute(fake_acl, tiny_models, tmp_path):
    """Point 1: a 1.5 s execute (the GIL held, as by aclruntime) must not stop the
    executor's other threads: its heartbeat runs on the assembling thread."""
    fake_acl.configure(execute_ms=1500)
    backend = open_acl(with_om(tiny_models["labels"], tmp_path))
    try:
        with beating(0.01) as beats:
            run_like_the_executor(backend,
                                  [random_batch(BATCH, SIZE, seed=k) for k in range(2)])
    finally:
        backend.close()
    runs = fake_acl.events("run")
    start, end = runs[0]["start"], runs[-1]["end"]
    pauses = np.diff([start, *(t for t in beats if start < t < end), end])
    assert pauses.max() < 0.5, f"no beat for {pauses.max():.2f} s while batches executed"


def test_old_wheel_every_thread_that_runs_has_a_context(fake_acl, tiny_models, references,
                                                       tmp_path):
    """Point 2: a 2023 wheel binds ACL's context in to_device but not in run. Every thread
    that calls run must have made a binding call first; the batches must all succeed.
    In-process (h2d on the assembling thread), the runner thread's first call was run."""
    fake_acl.configure(release="2023")
    backend = open_acl(with_om(tiny_models["logits"], tmp_path))
    batches = [random_batch(BATCH, SIZE, seed=20 + k) for k in range(4)]
    results = run_like_the_executor(backend, batches)
    backend.close()
    for k, (images, boxes) in enumerate(batches):
        assert_matches("logits", results[k], reference(references["logits"], images, boxes))
    events = fake_acl.events()
    for run in (e for e in events if e["op"] == "run"):
        bound = [e for e in events if e["op"] in ("session", "to_device", "set_context")
                 and (e["pid"], e["thread"]) == (run["pid"], run["thread"])
                 and e["start"] < run["start"]]
        assert bound, f"run on thread {run['thread']} with no context bound there"


def _bad_char(model_dir: Path, tmp_path: Path) -> Path:
    return with_om(model_dir, tmp_path / "my models")


def _symlink(model_dir: Path, tmp_path: Path) -> Path:
    out = with_om(model_dir, tmp_path)
    om = out / Manifest.read(out).models[BATCH].om
    om.rename(out / "real.om")
    om.symlink_to("real.om")
    return out


def _mode(mode: int):
    def make(model_dir: Path, tmp_path: Path) -> Path:
        out = with_om(model_dir, tmp_path)
        (out / Manifest.read(out).models[BATCH].om).chmod(mode)
        return out
    return make


def _suffix(model_dir: Path, tmp_path: Path) -> Path:
    out = with_om(model_dir, tmp_path)
    manifest = Manifest.read(out)
    files = manifest.models[BATCH]
    (out / files.om).rename(out / "fake_bs4.bin")
    manifest.models[BATCH] = dataclasses.replace(files, om="fake_bs4.bin")
    manifest.write(out)
    return out


def _deep(model_dir: Path, tmp_path: Path) -> Path:
    return with_om(model_dir, tmp_path.joinpath(*["d"] * 32))


PATH_CASES = {
    "character": (_bad_char, r"characters outside \[A-Za-z0-9_\./-\] \(here ' '\), in the "
                             "whole absolute path; move or rename"),
    "deep": (_deep, r"more than 32 '/'; move the model directory higher up"),
    "owner_unreadable": (_mode(0o240), r"not readable by its owner.*\(0240\).*chmod 640"),
    "symlink": (_symlink, r"symbolic link, which aclruntime refuses; put the file itself"),
    "group_writable": (_mode(0o660), r"group- or other-writable \(0660\).*chmod 640"),
    "other_writable": (_mode(0o642), r"group- or other-writable \(0642\).*chmod 640"),
    "suffix": (_suffix, r"aclruntime wants a \.om file"),
}


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("case", PATH_CASES)
def test_model_path_rules_checked_before_loading(fake_acl, case, release, tiny_models,
                                                 tmp_path):
    """Point 4: paths aclruntime 2024-08+ refuses ("please check model path", nothing more)
    are refused before loading with what is wrong and the fix, whatever the release."""
    fake_acl.configure(release=release)
    make, message = PATH_CASES[case]
    model_dir = make(tiny_models["logits"], tmp_path)
    with pytest.raises(ValueError, match=message):
        open_acl(model_dir)
    assert fake_acl.events("session") == []          # nothing was loaded


def test_an_om_that_atc_named_with_os_and_arch_is_named_in_the_error(fake_acl, tiny_models,
                                                                    tmp_path):
    """A user who ran ATC by hand (CANN 7+: pspnet_bsN_linux_aarch64.om) is told the mv."""
    model_dir = with_om(tiny_models["logits"], tmp_path)
    om = model_dir / Manifest.read(model_dir).models[BATCH].om
    om.rename(om.with_name(f"{om.stem}_linux_aarch64.om"))
    with pytest.raises(FileNotFoundError, match=rf"ATC wrote {om.stem}_linux_aarch64\.om "
                                                rf".*: mv .*_linux_aarch64\.om {om}$"):
        open_acl(model_dir)


@pytest.mark.parametrize("release", RELEASES)
def test_a_relative_model_path_is_checked_and_loaded_as_absolute(fake_acl, release,
                                                                 tiny_models, tmp_path,
                                                                 monkeypatch):
    """aclruntime checks a relative path joined to the working directory: `--model m` run
    from a directory whose path has a space is refused up front, naming the absolute path;
    from a clean one the session gets the absolute path, whatever its own directory."""
    fake_acl.configure(release=release)
    spaced = with_om(tiny_models["logits"], tmp_path / "my models")
    monkeypatch.chdir(spaced.parent)
    with pytest.raises(ValueError, match=r"'/.*/my models/.*\.om'.*\(here ' '\)"):
        open_acl(Path(spaced.name))
    assert fake_acl.events("session") == []
    clean = with_om(tiny_models["logits"], tmp_path / "clean")
    monkeypatch.chdir(clean.parent)
    open_acl(Path(clean.name)).close()
    [event] = fake_acl.events("session")
    assert event["model"] == str(clean / Manifest.read(clean).models[BATCH].om)


def test_stand_in_checks_the_absolute_path_as_aclruntime_does(fake_acl, tiny_models,
                                                              tmp_path, monkeypatch):
    """The 2024-08+ wheel's File::CheckFileBeforeRead, on the stand-in: a relative path is
    checked joined to the working directory; an owner-unreadable OM is refused too."""
    fake_acl.configure(release="2025")
    aclruntime = fake_acl.module()
    spaced = with_om(tiny_models["logits"], tmp_path / "my models")
    om = Manifest.read(spaced).models[BATCH].om
    monkeypatch.chdir(spaced)
    with pytest.raises(RuntimeError, match="^please check model path$"):
        aclruntime.InferenceSession(om, 0, aclruntime.session_options())
    clean = with_om(tiny_models["logits"], tmp_path / "clean")
    monkeypatch.chdir(clean)
    aclruntime.InferenceSession(om, 0, aclruntime.session_options())   # relative, clean
    (clean / om).chmod(0o040)
    with pytest.raises(RuntimeError, match="^please check model path$"):
        aclruntime.InferenceSession(om, 0, aclruntime.session_options())


@pytest.mark.parametrize("release", RELEASES)
def test_log_level_only_1_to_4(fake_acl, release, tiny_models, tmp_path):
    """Point 6: aclruntime since 2024-02 throws outside 1..4; refused up front, in words."""
    fake_acl.configure(release=release)
    model_dir = with_om(tiny_models["logits"], tmp_path)
    for bad in ("0", "5"):
        with pytest.raises(ValueError, match=r"log_level=\d: aclruntime takes 1 \(debug\) "
                                             r"to 4 \(error\); its default is 2"):
            open_acl(model_dir, options={"log_level": bad})
    assert fake_acl.events("session") == []
    open_acl(model_dir, options={"log_level": "1"}).close()
    open_acl(model_dir).close()
    assert [e["log_level"] for e in fake_acl.events("session")] == [1, 2]


# ---- context, feeds, precision ---------------------------------------------------------------

@pytest.mark.parametrize("release", RELEASES)
def test_bind_context_on_a_new_thread(fake_acl, release, tiny_models, tmp_path):
    """bind_context: set_context where the release has it, else a tiny to_device; after it,
    run works on a thread that never touched aclruntime (on 2023 wheels, not before)."""
    from pspnet.stages.backends.acl_session import bind_context

    fake_acl.configure(release=release)
    aclruntime = fake_acl.module()
    model_dir = with_om(tiny_models["logits"], tmp_path)
    om = str(model_dir / Manifest.read(model_dir).models[BATCH].om)
    session = aclruntime.InferenceSession(om, 0, aclruntime.session_options())
    images, boxes = random_batch(BATCH, SIZE, seed=1)
    feeds = [aclruntime.BaseTensor(a.ctypes.data, a.nbytes) for a in (images, boxes)]
    outcome: dict[str, object] = {}

    def on_a_new_thread() -> None:
        try:
            session.run(["logits"], feeds)
            outcome["before"] = "ran"
        except RuntimeError as error:
            outcome["before"] = str(error)
        outcome["how"] = bind_context(aclruntime, session, 0)
        outcome["after"] = session.run(["logits"], feeds)[0].device

    thread = threading.Thread(target=on_a_new_thread)
    thread.start()
    thread.join()
    if release == "2023":
        assert "no current ACL context on this thread" in str(outcome["before"])
        assert outcome["how"] == "to_device"
    else:
        assert outcome["before"] == "ran"
        assert outcome["how"] == "set_context"
    assert outcome["after"] == 0


@pytest.mark.parametrize(("base_tensor", "option", "feed"), [
    (True, "auto", "BaseTensor"), (False, "auto", "Tensor"), (True, "tensor", "Tensor")])
def test_feeds(fake_acl, base_tensor, option, feed, tiny_models, references, tmp_path):
    """BaseTensor pointers into the shared slots where the release has it (one copy, inside
    run), else Tensor + to_device; both give the reference output."""
    fake_acl.configure(base_tensor=base_tensor)
    backend = open_acl(with_om(tiny_models["labels"], tmp_path), options={"feed": option})
    assert backend.feed == feed
    assert backend.runtime_features["base_tensor"] is base_tensor
    images, boxes = random_batch(BATCH, SIZE, seed=3)
    backend.upload(0, images, boxes)
    assert_matches("labels", backend.execute(0),
                   reference(references["labels"], images, boxes))
    backend.close()
    assert [e["feeds"] for e in fake_acl.events("run")] == [feed]
    uploads = [e["nbytes"] for e in fake_acl.events("to_device")]
    if feed == "Tensor":
        assert sorted(uploads)[-2:] == sorted([images.nbytes, boxes.nbytes])


def test_host_buffers_are_what_the_session_reads(fake_acl, tiny_models, references,
                                                 tmp_path):
    """Filled in place, a slot is run as it is: upload copies nothing, and a later fill of
    the slot does not change an output already collected."""
    backend = open_acl(with_om(tiny_models["logits"], tmp_path))
    images, boxes = backend.host_buffers(1)
    assert backend.host_buffers(1)[0] is images and backend.host_buffers(0)[0] is not images
    want_images, want_boxes = random_batch(BATCH, SIZE, seed=5)
    np.copyto(images, want_images)
    np.copyto(boxes, want_boxes)
    backend.upload(1, images, boxes)
    out = backend.execute(1)
    images.fill(0)
    backend.upload(1, images, boxes)
    backend.execute(1)
    assert_matches("logits", out, reference(references["logits"], want_images, want_boxes))
    backend.close()


def test_precision_is_the_om_s(fake_acl, tiny_models, tmp_path):
    """The OM computes in what ATC was told; the backend says so and refuses another."""
    fp16 = with_om(tiny_models["logits"], tmp_path / "a", precision="fp16")
    with pytest.raises(ValueError, match=r"this OM computes in fp16 \(its ATC script set "
                                         r"--precision_mode=force_fp16\); pass precision fp16, "
                                         r"or rebuild with `pspnet build --om-precision fp32`"):
        open_acl(fp16, precision="fp32")
    backend = open_acl(fp16, precision="fp16")
    assert backend.precision == "fp16"
    backend.close()
    with pytest.raises(ValueError, match="runs fp16/fp32 on npu"):
        open_acl(fp16, precision="bf16")
    # a manifest from before om_precision: its script set no --precision_mode, so fp16
    old = with_om(tiny_models["logits"], tmp_path / "b")
    dataclasses.replace(Manifest.read(old), om_precision=None).write(old)
    with pytest.raises(ValueError, match="no --precision_mode: ATC's default, force_fp16"):
        open_acl(old, precision="fp32")


# ---- errors and lifecycle ------------------------------------------------------------------

def test_missing_aclruntime(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "aclruntime", None)    # import raises ImportError
    with pytest.raises(BackendUnavailable, match="aclruntime not found: it ships with "
                                                 "ais_bench"):
        open_acl(with_om(tiny_models["logits"], tmp_path))


def test_aclruntime_that_fails_to_import_in_the_session(fake_acl, tiny_models, tmp_path,
                                                        monkeypatch):
    monkeypatch.setenv("FAKE_ACLRUNTIME_RELEASE", "1999")  # the stand-in's import fails
    with pytest.raises(BackendUnavailable, match="aclruntime not found.*1999"):
        open_acl(with_om(tiny_models["logits"], tmp_path))


def test_missing_om(fake_acl, tiny_models):
    with pytest.raises(FileNotFoundError, match=r"pspnet_bs4\.atc\.sh"):
        open_acl(tiny_models["logits"])


def test_device_and_options(fake_acl, tiny_models, tmp_path):
    model_dir = with_om(tiny_models["logits"], tmp_path)
    with pytest.raises(ValueError, match="Ascend NPU"):
        open_backend("acl", model_dir, BATCH, precision="fp32")   # the default is "cpu"
    with pytest.raises(RuntimeError, match="not available"):
        open_backend("acl", model_dir, BATCH, device="npu:3", precision="fp32")
    with pytest.raises(ValueError, match="feed='fast': auto or tensor"):
        open_acl(model_dir, options={"feed": "fast"})
    with pytest.raises(ValueError, match="unknown acl backend option"):
        open_acl(model_dir, options={"h2d": "upload"})
    with pytest.raises(ValueError, match=r"acl_json_path .*wants a \.json file"):
        open_acl(model_dir, options={"acl_json_path": str(model_dir / "manifest.jsn")})
    with pytest.raises(FileNotFoundError, match="acl_json_path .*no such file"):
        open_acl(model_dir, options={"acl_json_path": str(tmp_path / "acl.json")})
    # the model-free checks, for a caller that validates flags before starting workers
    from pspnet.stages.backends.acl import check

    assert check("npu:2", "fp16", {"log_level": "3"}) == 2
    with pytest.raises(ValueError, match="log_level=0"):
        check("npu", "fp16", {"log_level": "0"})


def test_om_of_wrong_batch_is_refused_at_open(fake_acl, tiny_models, tmp_path):
    model_dir = with_om(tiny_models["logits"], tmp_path, om_batch={BATCH: 1})
    with pytest.raises(ValueError, match=r"OM input .*expected \[4, 64, 64, 3\].*bytes"):
        open_acl(model_dir)


def test_wrong_batch_upload(fake_acl, tiny_models, tmp_path):
    backend = open_acl(with_om(tiny_models["logits"], tmp_path))
    images, boxes = random_batch(2, SIZE, seed=0)
    with pytest.raises(ValueError, match="pad a partial batch"):
        backend.upload(0, images, boxes)
    images, boxes = random_batch(BATCH, SIZE, seed=0)
    backend.upload(0, images, boxes)
    backend.launch(0)
    with pytest.raises(RuntimeError, match="twice"):
        backend.launch(0)
    backend.collect(0)
    backend.close()


@pytest.mark.parametrize("release", RELEASES)
def test_timings_and_close(fake_acl, release, tiny_models, tmp_path):
    """Execute times from the runtime's own summary (ms, or (start, end) pairs); close
    frees the session (free_resource, else finalize) and the process exits."""
    fake_acl.configure(release=release, execute_ms=5)
    backend = open_acl(with_om(tiny_models["labels"], tmp_path))
    for k in range(3):
        backend.upload(k % NUM_SLOTS, *random_batch(BATCH, SIZE, seed=k))
        backend.execute(k % NUM_SLOTS)
    assert len(backend.execute_times_ms) == 3
    assert all(5 <= t < 60_000 for t in backend.execute_times_ms)
    # the summary is cleared after each read, whichever way the release spells it: a list
    # never cleared would grow for the daemon's life and be copied whole at every batch
    assert len(fake_acl.events("reset_summary")) == 4      # at start, then after each run
    process = backend._session.proc
    backend.close()
    backend.close()                         # idempotent
    assert process.returncode == 0
    freed = "free_resource" if release != "2023" else "finalize"
    assert [e["op"] for e in fake_acl.events() if e["op"] in ("free_resource", "finalize")] \
        == [freed]
    with pytest.raises(RuntimeError, match="closed"):
        backend.launch(0)


def test_a_dead_session_process_fails_the_batch(fake_acl, tiny_models, tmp_path):
    """The session process killed (a driver crash): collect and later launches raise, so
    the executor answers the batch with the error and, after a few, restarts itself."""
    backend = open_acl(with_om(tiny_models["logits"], tmp_path))
    backend.upload(0, *random_batch(BATCH, SIZE, seed=0))
    os.kill(backend._session.proc.pid, signal.SIGKILL)
    backend._session.proc.wait()
    with pytest.raises(RuntimeError, match="acl session process exited with status -9"):
        backend.launch(0)
        backend.collect(0)
    backend.upload(1, *random_batch(BATCH, SIZE, seed=1))
    with pytest.raises(RuntimeError, match="acl session process"):
        backend.launch(1)
        backend.collect(1)
    backend.close()


def test_executor_exit_ends_the_session_process(fake_acl, tiny_models, tmp_path):
    """If the executor dies without closing, the session process sees its socket close and
    exits (after the call in progress)."""
    backend = open_acl(with_om(tiny_models["logits"], tmp_path))
    process = backend._session.proc
    backend._session.channel.close()        # what the kernel does when the executor dies
    assert process.wait(timeout=30) == 0
    backend.close()


# ---- the stand-in itself ---------------------------------------------------------------------

@pytest.mark.parametrize("release", RELEASES)
def test_stand_in_enforces_contract(fake_acl, release, tiny_models, tmp_path):
    """What the backend must get right, checked on the stand-in itself."""
    fake_acl.configure(release=release)
    aclruntime = fake_acl.module()
    model_dir = with_om(tiny_models["logits"], tmp_path)
    om = str(model_dir / Manifest.read(model_dir).models[BATCH].om)
    with pytest.raises(TypeError, match="incompatible constructor"):
        aclruntime.InferenceSession(om, 0, None)
    options = aclruntime.session_options()
    assert options.log_level == 2
    options.log_level = 0
    if release != "2023":
        with pytest.raises(RuntimeError, match="log_level"):
            aclruntime.InferenceSession(om, 0, options)
        (model_dir / "x.om").symlink_to(Path(om).name)
        with pytest.raises(RuntimeError, match="^please check model path$"):
            aclruntime.InferenceSession(str(model_dir / "x.om"), 0,
                                        aclruntime.session_options())
    session = aclruntime.InferenceSession(om, 0, aclruntime.session_options())
    assert hasattr(session, "set_context") is (release != "2023")
    assert hasattr(session, "free_resource") is (release != "2023")
    [out_desc] = session.get_outputs()
    images, boxes = random_batch(BATCH, SIZE, seed=1)
    small, small_boxes = random_batch(2, SIZE, seed=1)

    feeds = [aclruntime.Tensor(images), aclruntime.Tensor(boxes)]
    assert {n for n in dir(feeds[0]) if not n.startswith("_")} == \
        {"type", "device", "dtype", "shape", "to_device", "to_host"}
    with pytest.raises(RuntimeError, match="call to_device"):
        session.run([out_desc.name], feeds)
    with pytest.raises(TypeError, match="aclruntime.Tensor"):
        session.run([out_desc.name], [images, boxes])
    wrong = [aclruntime.Tensor(small), aclruntime.Tensor(small_boxes)]
    for tensor in wrong:
        tensor.to_device(0)
    with pytest.raises(RuntimeError, match=r"in size 24576 needsize 49152 not match"):
        session.run([out_desc.name], wrong)
    pointers = [aclruntime.BaseTensor(a.ctypes.data, a.nbytes) for a in (small, small_boxes)]
    with pytest.raises(RuntimeError, match=r"in size 24576 needsize 49152 not match"):
        session.run([out_desc.name], pointers)

    for tensor in feeds:
        tensor.to_device(0)
    images[:] = 0                           # Tensor() copied: later changes don't leak in
    [out] = session.run([out_desc.name], feeds)
    assert out.device == 0
    on_device = np.array(out)               # numpy swallows the binding's buffer error
    assert on_device.shape == () and on_device.dtype == object
    out.to_host()
    assert np.array(out).shape == tuple(out_desc.shape)
    times = session.sumary().exec_time_list
    assert len(times) == 1 and isinstance(times[0], tuple) is (release != "2023")
    if release == "newest":
        assert not hasattr(session, "reset_sumaryinfo")
        session.reset_summaryinfo()
    else:
        session.reset_sumaryinfo()
    assert session.sumary().exec_time_list == []


def test_stand_in_run_holds_the_gil(fake_acl, tiny_models, tmp_path):
    """The stand-in's execute keeps every other thread of its process waiting."""
    fake_acl.configure(execute_ms=300)
    aclruntime = fake_acl.module()
    model_dir = with_om(tiny_models["logits"], tmp_path)
    om = str(model_dir / Manifest.read(model_dir).models[BATCH].om)
    session = aclruntime.InferenceSession(om, 0, aclruntime.session_options())
    feeds = [aclruntime.BaseTensor(a.ctypes.data, a.nbytes)
             for a in random_batch(BATCH, SIZE, seed=1)]
    with beating(0.005) as beats:
        time.sleep(0.05)
        session.run(["logits"], feeds)
        time.sleep(0.05)
    assert np.diff(beats).max() >= 0.3


def test_exec_times_formats():
    assert exec_times_ms([1.5, 2]) == [1.5, 2.0]
    assert exec_times_ms([(10.0, 12.5), [3, 4]]) == [2.5, 1.0]
    assert exec_times_ms([]) == []
