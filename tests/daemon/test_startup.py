"""`pspnet serve` start-up and endpoints: a taken, stale or malformed endpoint, a signal
while the children start, and clients that find no daemon.

* A second daemon on a live endpoint (ipc or tcp) is refused in one line, exit 2, before
  any child or run directory exists; the first keeps answering.
* An internal tcp port in use (--transport tcp) is "cannot start", exit 3, naming the port
  and the flag, not a ZeroMQ traceback.
* A malformed endpoint is refused in one line (serve, status, and the library client
  before it makes a socket).
* The ipc socket file goes away on an orderly exit; one left by a kill -9 is replaced.
* A serve that is still starting on an ipc path holds SOCKET.lock: a second one is refused
  in one line; a lock file left by a kill -9 stops nobody.
* A client whose ipc socket file is missing or stale says so at once.
* SIGTERM while a child keeps crashing during start-up stops the daemon in seconds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pspnet.daemon.client
from pspnet.daemon.client import Client, DaemonUnavailable
from pspnet.daemon.endpoint import EndpointLocked, lock_file, lock_socket_file, unlock_socket_file
from tests.kit import REPO, free_port, pid_alive


def serve(model: Path, tmp_path: Path, endpoint: str, *flags: str, timeout_s: float = 30,
          ) -> subprocess.CompletedProcess:
    """`pspnet serve` expected to give up at once; its temp dir is tmp_path/tmp."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    if endpoint.startswith("tcp://") and "--keys" not in flags and "no-keys" not in flags:
        flags = (*flags, "--keys", os.environ["PSPNET_KEYS"])     # tests/conftest.py's
    flags = tuple(f for f in flags if f != "no-keys")
    return subprocess.run(
        [sys.executable, "-m", "pspnet", "serve", "--model", str(model), "--out",
         str(tmp_path / "masks2"), "--endpoint", endpoint, "--log-format", "json", *flags],
        capture_output=True, text=True, timeout=timeout_s,
        env={**os.environ, "TMPDIR": str(tmp)})


def test_a_tcp_endpoint_without_keys_is_refused_in_one_line(tiny_models, tmp_path):
    """Issue 23: a tcp endpoint admits only clients with its client key (CurveZMQ), so
    serve refuses one without --keys before anything starts, naming the fix."""
    out = serve(tiny_models["logits"], tmp_path, f"tcp://127.0.0.1:{free_port()}", "no-keys")
    line = one_line_error(out)
    assert "--keys DIR" in line and "pspnet keys DIR" in line, line
    assert not run_dirs(tmp_path), "a run directory was made"


def run_dirs(tmp_path: Path) -> list[Path]:
    """The daemon's internal run directories (pspnet-XXXX) under the temp dir serve() gave."""
    return list((tmp_path / "tmp").glob("pspnet-*"))


def one_line_error(out: subprocess.CompletedProcess) -> str:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr
    return lines[0]


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_second_serve_on_a_live_endpoint_is_refused(tiny_models, tmp_path, daemons, transport):
    endpoint = (f"ipc://{tmp_path}/front" if transport == "ipc"
                else f"tcp://127.0.0.1:{free_port()}")
    first = daemons(tiny_models["logits"], tmp_path / "masks", tmp_path, "--batch-size", "4",
                    "--preprocess-workers", "1", "--postprocess-workers", "1",
                    endpoint=endpoint)
    try:
        pid = first.wait_ready()["daemon"]["pid"]
        t = time.monotonic()
        out = serve(tiny_models["logits"], tmp_path, endpoint)
        took = time.monotonic() - t
        line = one_line_error(out)
        assert line == (f"pspnet serve: error: a daemon (pid {pid}) already answers at "
                        f"{endpoint}: stop it (`kill {pid}` drains it first) or give this "
                        "one another --endpoint")
        assert not run_dirs(tmp_path), "a run directory was made"
        assert first.status()["daemon"]["pid"] == pid, "the first daemon lost its endpoint"
        print(f"second serve refused in {took:.1f} s: {line}")
    finally:
        assert first.stop() == 0, first.logs()


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1", "foo://bar", "tcp://127.0.0.1:99999",
                                      "ipc://", "ipc://.", "ipc:///", "ipc:///tmp/"])
def test_malformed_endpoint_is_refused_in_one_line(tiny_models, tmp_path, endpoint):
    line = one_line_error(serve(tiny_models["logits"], tmp_path, endpoint))
    assert line.startswith("pspnet serve: error: ") and "ipc://PATH" in line, line
    assert not run_dirs(tmp_path), "a run directory was made"
    status = subprocess.run([sys.executable, "-m", "pspnet", "status", "--endpoint",
                             endpoint], capture_output=True, text=True, timeout=30)
    assert status.returncode == 2 and "Traceback" not in status.stderr, status.stderr


def test_client_refuses_a_malformed_endpoint_before_any_socket(monkeypatch):

    def no_context() -> None:
        raise AssertionError("a ZeroMQ context was made for a malformed endpoint")

    monkeypatch.setattr(pspnet.daemon.client.zmq, "Context", no_context)
    for endpoint in ("tcp://127.0.0.1", "foo://bar", "tcp://host:port", "ipc://",
                     "ipc:///" + "x" * 120):
        with pytest.raises(ValueError, match="endpoints are ipc://PATH or tcp://HOST:PORT"):
            Client(endpoint)


def test_client_without_daemon_answers_at_once(tmp_path):
    missing = tmp_path / "no-such-socket"
    stale = tmp_path / "stale"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)   # bound, never listening:
    sock.bind(str(stale))                                      # what a kill -9 leaves
    sock.close()
    for path, words in ((missing, "does not exist"), (stale, "nothing listens")):
        for command in (["status"], ["submit", "/etc/hostname"]):
            t = time.monotonic()
            out = subprocess.run([sys.executable, "-m", "pspnet", *command,
                                  "--endpoint", f"ipc://{path}"],
                                 capture_output=True, text=True, timeout=30)
            took = time.monotonic() - t
            assert out.returncode == 4, out.stderr
            assert str(path) in out.stderr and words in out.stderr, out.stderr
            assert took < 4, f"{command[0]} took {took:.1f} s to say no daemon answers"
        with Client(f"ipc://{path}") as client, pytest.raises(DaemonUnavailable, match=words):
            list(client.submit(["/etc/hostname"]))


def test_ipc_socket_file_removed_on_clean_stop_and_a_stale_one_replaced(
        tiny_models, tmp_path, daemons):
    args = ("--batch-size", "4", "--preprocess-workers", "1", "--postprocess-workers", "1")
    daemon = daemons(tiny_models["logits"], tmp_path / "masks", tmp_path, *args)
    socket_file = Path(daemon.endpoint.removeprefix("ipc://"))
    daemon.wait_ready()
    daemon.kill_front()                                # kill -9: the file stays, stale
    assert socket_file.is_socket()
    daemon = daemons(tiny_models["logits"], tmp_path / "masks", tmp_path, *args)
    try:
        daemon.wait_ready()
        assert any(e.get("event") == "removed a stale socket file" for e in daemon.events())
    finally:
        assert daemon.stop() == 0, daemon.logs()
    assert not socket_file.exists(), "the socket file outlived a clean stop"
    assert not lock_file(socket_file).exists(), "the lock file outlived a clean stop"


def test_a_serve_starting_on_the_same_ipc_path_is_refused(tiny_models, tmp_path):
    """Two serves in the same instant: each checks the path, finds it free, binds, and the
    later bind takes the file from the earlier. The lock makes the check and the bind one
    step; here this test holds the lock, as a serve still starting would."""
    socket_file = tmp_path / "front"
    fd = lock_socket_file(socket_file)
    try:
        t = time.monotonic()
        out = serve(tiny_models["logits"], tmp_path, f"ipc://{socket_file}")
        took = time.monotonic() - t
    finally:
        unlock_socket_file(socket_file, fd)
    line = one_line_error(out)
    assert line == (f"pspnet serve: error: ipc://{socket_file}: another pspnet serve (pid "
                    f"{os.getpid()}) is starting or serving there (it holds "
                    f"{lock_file(socket_file)})"), line
    assert not socket_file.exists() and not run_dirs(tmp_path)
    assert not lock_file(socket_file).exists()
    with pytest.raises(EndpointLocked):            # and the lock is exclusive in-process too
        fd = lock_socket_file(socket_file)
        try:
            lock_socket_file(socket_file)
        finally:
            unlock_socket_file(socket_file, fd)
    print(f"refused in {took:.1f} s: {line}")


def test_a_lock_file_left_by_a_kill_9_stops_nobody(tiny_models, tmp_path, daemons):
    socket_file = tmp_path / "front"
    lock_file(socket_file).write_text("99999999\n")      # a dead holder's, unlocked
    daemon = daemons(tiny_models["logits"], tmp_path / "masks", tmp_path, "--batch-size", "4",
                     "--preprocess-workers", "1", "--postprocess-workers", "1",
                     endpoint=f"ipc://{socket_file}")
    try:
        pid = daemon.wait_ready()["daemon"]["pid"]
        assert lock_file(socket_file).read_text() == f"{pid}\n"
    finally:
        assert daemon.stop() == 0, daemon.logs()
    assert not lock_file(socket_file).exists()


# Loaded by every Python process that finds it on PYTHONPATH: the daemon's postprocess
# workers (`python -m pspnet.stages.worker postprocess I`) die as they start, a broken install,
# say, and are restarted with back-off until the 120 s start-up timeout.
CRASHING_POSTPROCESS = """\
import os
import sys

if sys.argv[1:2] == ["postprocess"]:
    os._exit(1)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_start_up_stops_promptly(tiny_models, tmp_path, daemons, signum):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CRASHING_POSTPROCESS)
    (tmp_path / "tmp").mkdir()
    daemon = daemons(tiny_models["logits"], tmp_path / "masks", tmp_path, "--batch-size", "4",
                     "--preprocess-workers", "1", "--postprocess-workers", "1",
                     env={"TMPDIR": str(tmp_path / "tmp"),
                          "PYTHONPATH": f"{hook}{os.pathsep}{REPO}"})
    deadline = time.monotonic() + 60
    while not any(e.get("event") == "child died" and e.get("child") == "postprocess-0"
                  for e in daemon.events()):
        assert daemon.proc.poll() is None and time.monotonic() < deadline, daemon.logs()
        time.sleep(0.1)
    children = daemon.started_pids()
    daemon.signal(signum)
    t = time.monotonic()
    code = daemon.proc.wait(30)
    took = time.monotonic() - t
    assert code == 1, daemon.logs()
    assert took < 8, f"{took:.1f} s to stop during start-up"
    assert any(e.get("event", "").startswith("signal during start-up") for e in daemon.events())
    assert children and not [p for p in children if pid_alive(p)], "children left"
    assert not run_dirs(tmp_path), "the run directory was left behind"
    assert not Path(daemon.endpoint.removeprefix("ipc://")).exists(), \
        "the socket file was left"
    print(f"{signal.Signals(signum).name} during a crashing start-up: exit 1 in {took:.1f} s")


def test_an_internal_tcp_port_in_use_is_named_not_a_traceback(tiny_models, tmp_path):
    """--transport tcp: the front's control port (--tcp-base-port) taken by another
    program is "cannot start" naming the port and the flag, before any worker starts."""
    base = free_port()
    taken = socket.socket()                    # listening: ZeroMQ's bind gets EADDRINUSE
    taken.bind(("127.0.0.1", base))
    taken.listen()
    try:
        out = serve(tiny_models["labels"], tmp_path, f"tcp://127.0.0.1:{free_port()}",
                    "--transport", "tcp", "--tcp-base-port", str(base))
    finally:
        taken.close()
    assert out.returncode == 3, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    events = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    (failed,) = [e for e in events if e.get("event") == "cannot start"]
    assert f"cannot listen at tcp://127.0.0.1:{base}" in failed["error"]
    assert f"uses port {base} on 127.0.0.1" in failed["error"]
    assert "--tcp-base-port" in failed["error"]
    assert not any(e.get("event") == "child started" for e in events)
    assert run_dirs(tmp_path) == []


def test_the_lock_file_is_never_written_through_a_link(tiny_models, tmp_path):
    socket_file = tmp_path / "front"
    victim = tmp_path / "victim.txt"
    victim.write_text("important data\n")
    lock_file(socket_file).symlink_to(victim)
    line = one_line_error(serve(tiny_models["logits"], tmp_path, f"ipc://{socket_file}"))
    assert line.endswith(f"{lock_file(socket_file)} is a symbolic link; not writing through "
                         "it"), line
    assert victim.read_text() == "important data\n"
    assert not socket_file.exists() and not run_dirs(tmp_path)


def test_an_ipc_path_in_a_missing_folder_names_the_folder(tiny_models, tmp_path):
    endpoint = f"ipc://{tmp_path}/no-such-dir/front"
    line = one_line_error(serve(tiny_models["logits"], tmp_path, endpoint))
    assert line == (f"pspnet serve: error: cannot listen at {endpoint}: no directory "
                    f"{tmp_path}/no-such-dir"), line


def test_a_lock_holder_that_has_not_written_its_pid_yet_is_not_misnamed(tmp_path):
    """The holder writes its pid just after it locks: a loser in between reads an earlier,
    dead holder's pid (or nothing), and must not name it."""
    import fcntl

    socket_file = tmp_path / "front"
    lock_file(socket_file).write_text("999999999\n")        # no such process
    with open(lock_file(socket_file), "r+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)                     # locked, pid not yet written
        with pytest.raises(EndpointLocked) as refused:
            lock_socket_file(socket_file)
    assert str(refused.value) == ("another pspnet serve is starting or serving there (it "
                                  f"holds {lock_file(socket_file)})")
