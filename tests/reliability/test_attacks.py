"""Issue 14: attacks on the daemon's front, made as an outside user would make them.

Each test is the behaviour the rewritten front must have, against `pspnet serve` as a real
process (tiny model, ort backend, real sockets): a symbolic-link loop under --allow-root, a
flood of status queries and garbage from one connection, running the daemon out of file
descriptors, signals to the process group, a request id repeated, an abstract ipc
endpoint. Each docstring says what the test proves and how the front before the redesign
failed it.
"""

from __future__ import annotations

import collections
import json
import os
import resource
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from pspnet.core import wire
from pspnet.daemon.client import Client, DaemonUnavailable
from tests.kit import (
    REPO,
    Daemon,
    RawClient,
    Submitter,
    dealer,
    fd_count,
    kill9,
    linked_stream,
    mask_pixels,
    requests,
    status_over,
    submit_all,
    wait_dead,
)

ARGS = ("--batch-size", "4", "--preprocess-workers", "1", "--postprocess-workers", "1")
FLOOD_S = 20.0                  # the flood
FLOOD_GARBAGE_EVERY = 10        # one message in ten is a malformed frame
FLOOD_SLOWDOWN_BOUND = 10.0     # liveness bound on 20 images during the flood vs quiet,
FLOOD_BOUND_FLOOR_S = 5.0       # and never under this: quiet takes a few tenths of a second
FLOOD_GOAL = 3.0                # the goal: reported, not asserted
ANSWER_WAIT_S = 15.0            # for the status replies of many connections
DOOR_REOPEN_S = 10.0            # liveness bound: a closed door opens once connections drop


# ---------------------------------------------------------------------------------------
# helpers


def exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited {code}"


def drive(daemon: Daemon, clients: list[RawClient], done: Callable[[], bool],
          timeout_s: float, since: float, what: str) -> None:
    """Step every client until done(); fail at once when the daemon exits, or at the
    deadline, saying what each client has been answered."""
    deadline = time.monotonic() + timeout_s
    while not done():
        for client in clients:
            client.step(10)
        code = daemon.proc.poll()
        if code is not None:
            pytest.fail(f"daemon {exit_text(code)} {time.monotonic() - since:.1f} s after "
                        f"{what}; answered so far: {[c.answered for c in clients]} of "
                        f"{[len(c.by_id) for c in clients]}\n{daemon.tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"not done {timeout_s:.0f} s after {what}: answered "
                        f"{[c.answered for c in clients]} of {[len(c.by_id) for c in clients]}")


# ---------------------------------------------------------------------------------------
# 1. a symbolic-link loop under --allow-root


def test_symlink_loop_under_allow_root_is_one_error_not_a_crash(tiny_models, photo_files,
                                                                tmp_path, daemons):
    """A client names R/a where `ln -s b R/a; ln -s a R/b`, while another streams 150
    images from R: the daemon stays up, the loop is answered once with an error naming
    the path, and every image of the other client is answered once, ok.

    Before the redesign: Path.resolve() in the front's --allow-root check raised
    RuntimeError ("Symlink loop from '.../allowed/a'") out of the loop: the daemon exited
    1, 0.9 s after B's submit (the issue: 0.7 s), A answered 21-24 of 150."""
    allowed = tmp_path / "allowed"
    paths = linked_stream(photo_files, allowed, 150)
    os.symlink("b", allowed / "a")
    os.symlink("a", allowed / "b")
    loop = allowed / "a"
    daemon = daemons(tiny_models["logits"], tmp_path / "masks", tmp_path, *ARGS,
                     "--allow-root", str(allowed))
    daemon.wait_ready()
    a, b = RawClient(daemon.endpoint), RawClient(daemon.endpoint)
    try:
        a.offer(requests("a", paths))
        drive(daemon, [a], lambda: a.answered >= 20, 60, time.monotonic(), "A's first submit")
        b.offer([wire.Request("loop", str(loop))])
        sent_at = time.monotonic()
        drive(daemon, [a, b], lambda: a.answered == 150 and b.answered == 1, 60, sent_at,
              f"B's submit of {loop} (a symlink loop)")
        a.pump(300)                               # a late duplicate would show here
        b.pump(300)
        assert daemon.proc.poll() is None, exit_text(daemon.proc.returncode)
        assert b.result_count == {"loop": 1}, b.result_count
        answer = b.results["loop"]
        assert answer.status == wire.ERROR and str(loop) in (answer.error or ""), answer
        assert set(a.result_count.values()) == {1} and len(a.result_count) == 150
        bad = {i: r.error for i, r in a.results.items() if r.status != wire.OK}
        assert not bad, bad
        print(f"\nFIGURE symlink loop: daemon alive; B answered once: {answer.error!r}; "
              f"A 150/150 ok, each once")
    finally:
        a.close()
        b.close()
    assert daemon.stop() == 0, daemon.tail()


# ---------------------------------------------------------------------------------------
# 2. a flood of status queries and garbage from one connection

FLOODER = """
import json, sys, time
import zmq
from pspnet.core import wire
endpoint, seconds, garbage_every = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
ctx = zmq.Context()
sock = ctx.socket(zmq.DEALER)        # status queries and garbage -> daemon ROUTER
sock.setsockopt(zmq.LINGER, 0)
sock.setsockopt(zmq.SNDTIMEO, 100)   # a full pipe must not keep us past the end
sock.connect(endpoint)
query, garbage = wire.encode(wire.StatusQuery()), [b"\\xc1 not msgpack"]
sent = garbage_sent = replies = 0
print("flooding", flush=True)
started = time.monotonic()
end = started + seconds
while time.monotonic() < end:
    frames = garbage if sent % garbage_every == garbage_every - 1 else query
    try:
        sock.send_multipart(frames)
    except zmq.Again:
        continue
    sent += 1
    garbage_sent += frames is garbage
    if sent % 100 == 0:
        while sock.poll(0):
            sock.recv_multipart()
            replies += 1
print(json.dumps({"sent": sent, "garbage": garbage_sent, "replies": replies,
                  "seconds": time.monotonic() - started}), flush=True)
"""


def test_status_flood_from_one_connection_does_not_starve_clients(tiny_models, photo_files,
                                                                  tmp_path, daemons):
    """Another process floods the client endpoint from one DEALER for 20 s: status queries
    as fast as it can, one message in ten a garbage frame. A library client's 20 images
    meanwhile take less than 10 x what they take with the daemon quiet (or 5 s, if more), all
    ok (the issue's goal, under 3 x, is in the FIGURE line, not asserted).

    Before the redesign: the front read client messages until none was left, so the flood
    kept it from the pipeline. Here: quiet 0.2-0.4 s; during the flood none of the 20 was
    answered before the 5 s bound (20 x "timed out after 5.0 s"); with no bound they took
    19.3 s, until the flood ended (the issue: 1.1 s quiet, 58.8 s flooded). The flooder
    sent 11,000-20,000 messages/s."""
    paths = photo_files[:20]
    daemon = daemons(tiny_models["logits"], tmp_path / "masks", tmp_path, *ARGS)
    daemon.wait_ready()
    submit_all(daemon.endpoint, photo_files[20:24], timeout_s=60)      # warm every stage
    quiet, quiet_s = submit_all(daemon.endpoint, paths, timeout_s=60)
    assert [a.status for a in quiet] == ["ok"] * 20, [a.error for a in quiet][:3]
    bound_s = max(FLOOD_SLOWDOWN_BOUND * quiet_s, FLOOD_BOUND_FLOOR_S)
    flooder = subprocess.Popen(
        [sys.executable, "-c", FLOODER, daemon.endpoint, str(FLOOD_S), str(FLOOD_GARBAGE_EVERY)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert flooder.stdout.readline().strip() == "flooding", flooder.stderr.read()
        time.sleep(1.0)                                                 # flood under way
        flooded, flood_s = submit_all(daemon.endpoint, paths, timeout_s=bound_s)
        alive = daemon.proc.poll() is None
        out, err = flooder.communicate(timeout=FLOOD_S + 30)
    finally:
        if flooder.poll() is None:
            flooder.kill()
            flooder.wait(10)
    assert flooder.returncode == 0, err
    counts = json.loads(out.splitlines()[-1])
    ok = sum(a.status == "ok" for a in flooded)
    print(f"\nFIGURE status flood: 20 images quiet {quiet_s:.2f} s, during the flood "
          f"{flood_s:.2f} s ({ok}/20 ok{'' if ok == 20 else f', cut at {bound_s:.1f} s'}), "
          f"ratio {flood_s / quiet_s:.1f} (goal < {FLOOD_GOAL:g}, bound "
          f"{bound_s:.1f} s); flooder sent {counts['sent'] / counts['seconds']:,.0f} "
          f"messages/s ({counts['sent']:,} in {counts['seconds']:.1f} s, {counts['garbage']:,} "
          f"garbage), {counts['replies']:,} replies read")
    assert alive, f"daemon {exit_text(daemon.proc.returncode)} during the flood"
    assert len(flooded) == 20 and len({a.id for a in flooded}) == 20
    assert ok == 20, collections.Counter(a.error for a in flooded if a.status != "ok")
    assert flood_s < bound_s
    assert daemon.stop() == 0, daemon.tail()


# ---------------------------------------------------------------------------------------
# 3. running the daemon out of file descriptors


def open_connections(ctx: zmq.Context, endpoint: str, n: int) -> list[zmq.Socket]:
    """n connections, each a DEALER that sends one status query (so its handshake is
    made and the daemon holds a descriptor for it)."""
    query = wire.encode(wire.StatusQuery())
    sockets = []
    for _ in range(n):
        sock = dealer(ctx, endpoint)
        sock.send_multipart(query)
        sockets.append(sock)
    return sockets


def await_replies(daemon: Daemon, sockets: list[zmq.Socket], wait_s: float,
                  ) -> tuple[list[zmq.Socket], int]:
    """The connections answered within wait_s (or until the daemon exits), and the most
    descriptors the daemon's front held meanwhile (/proc/PID/fd)."""
    poller = zmq.Poller()
    for sock in sockets:
        poller.register(sock, zmq.POLLIN)
    answered: list[zmq.Socket] = []
    peak_fds = fd_count(daemon.proc.pid) or 0
    deadline = time.monotonic() + wait_s
    while len(answered) < len(sockets) and time.monotonic() < deadline \
            and daemon.proc.poll() is None:
        for sock, _ in poller.poll(200):
            sock.recv_multipart()
            poller.unregister(sock)
            answered.append(sock)
        peak_fds = max(peak_fds, fd_count(daemon.proc.pid) or 0)
    return answered, peak_fds


def wait_restarted(status: Callable[[], dict], stage: str, old_pid: int,
                   timeout_s: float = 20) -> tuple[int, float]:
    """The new pid of `stage`'s first process once it is back and alive, and how long."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        s = status()["stages"][stage]
        if s["pids"] and old_pid not in s["pids"] and s["alive"] == s["processes"]:
            return s["pids"][0], time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"{stage} (pid {old_pid}) not restarted within {timeout_s:.0f} s")


def door_reopened(daemon: Daemon, timeout_s: float = DOOR_REOPEN_S) -> float:
    """Seconds until the ipc path clients connect to is back (the door closed near the
    descriptor limit opens again once the connections are gone); fails after timeout_s."""
    path = Path(daemon.endpoint.removeprefix("ipc://"))
    started = time.monotonic()
    while not path.exists():
        assert time.monotonic() - started < timeout_s, (
            f"the door did not open again within {timeout_s:.0f} s of the connections "
            f"closing\n{daemon.tail()}")
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.fixture
def own_fd_limit_raised() -> Iterator[None]:
    """This process opens over a thousand connections: soft limit up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.usefixtures("own_fd_limit_raised")
def test_more_connections_than_the_soft_descriptor_limit(tiny_models, photo_files, tmp_path,
                                                         daemons):
    """The daemon starts with a soft RLIMIT_NOFILE of 1024 (hard limit as it is) on an ipc
    endpoint; 1,100 connections are opened, each sends a status query. The daemon stays
    up, a normal client's 20 images are answered ok meanwhile, and once the connections
    are closed a postprocess child killed with -9 is restarted.

    Before the redesign: ZeroMQ's ipc listener aborts when accept() fails with EMFILE
    ("Too many open files (src/ipc_listener.cpp:297)"): the front died of SIGABRT after
    901-959 of the 1,100 connections were answered (51 descriptors idle, 1,024 at the
    end)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    daemon = daemons(tiny_models["logits"], tmp_path / "masks", tmp_path, *ARGS,
                     nofile=(1024, hard))
    daemon.wait_ready()
    idle_fds = fd_count(daemon.proc.pid)
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 4096)
    sockets: list[zmq.Socket] = []
    try:
        sockets = open_connections(ctx, daemon.endpoint, 1100)
        answered, peak_fds = await_replies(daemon, sockets, ANSWER_WAIT_S)
        print(f"\nFIGURE descriptors (soft 1024, hard {hard}): 1,100 connections opened, "
              f"{len(answered)} answered; daemon front fds idle {idle_fds}, peak "
              f"{peak_fds} during the flood")
        assert daemon.proc.poll() is None, (
            f"daemon {exit_text(daemon.proc.returncode)} after {len(answered)} connections "
            f"were answered\n{daemon.tail()}")
        answers, took_s = submit_all(daemon.endpoint, photo_files[:20], timeout_s=30)
        assert [a.status for a in answers] == ["ok"] * 20, [a.error for a in answers][:3]
    finally:
        for sock in sockets:
            sock.close(0)
        ctx.term()
    time.sleep(0.5)
    old = daemon.status()["stages"]["postprocess"]["pids"][0]
    kill9(old)
    new, restart_s = wait_restarted(daemon.status, "postprocess", old)
    print(f"FIGURE descriptors: 20 images ok in {took_s:.1f} s with the 1,100 open; after "
          f"closing them, postprocess kill -9 (pid {old}) -> restarted as pid {new} in "
          f"{restart_s:.1f} s")
    assert daemon.stop() == 0, daemon.tail()


@pytest.mark.usefixtures("own_fd_limit_raised")
def test_connections_beyond_a_hard_descriptor_limit(tiny_models, photo_files, tmp_path,
                                                    daemons):
    """soft = hard = 256 for the daemon (so it cannot raise it), 400 connections: the
    daemon stays up and some connection is refused or left unanswered; a child killed
    with -9 meanwhile is restarted (a restart must not fail for lack of descriptors); once
    the 400 are closed the door opens again (within 10 s), and a normal client's 20 images
    are answered ok.

    Before the redesign: the front died of SIGABRT ("Too many open files
    (src/ipc_listener.cpp:297)") after 14-78 of the 400 connections were answered (it
    held 251-256 descriptors)."""
    daemon = daemons(tiny_models["logits"], tmp_path / "masks", tmp_path, *ARGS,
                     nofile=(256, 256))
    daemon.wait_ready()
    idle_fds = fd_count(daemon.proc.pid)
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 4096)
    control = dealer(ctx, daemon.endpoint)      # a connection made before the flood
    sockets: list[zmq.Socket] = []
    try:
        old = status_over(control)["stages"]["postprocess"]["pids"][0]
        sockets = open_connections(ctx, daemon.endpoint, 400)
        answered, peak_fds = await_replies(daemon, sockets, ANSWER_WAIT_S)
        print(f"\nFIGURE descriptors (soft = hard = 256): 400 connections attempted, "
              f"{len(answered)} answered, {400 - len(answered)} refused or unanswered; "
              f"daemon front fds idle {idle_fds}, peak {peak_fds} during the flood")
        assert daemon.proc.poll() is None, (
            f"daemon {exit_text(daemon.proc.returncode)} after {len(answered)} connections "
            f"were answered\n{daemon.tail()}")
        assert len(answered) < 400, "every connection answered: the limit was never reached"
        kill9(old)
        new, restart_s = wait_restarted(lambda: status_over(control), "postprocess", old)
        print(f"FIGURE descriptors: with the 400 open, postprocess kill -9 (pid {old}) -> "
              f"restarted as pid {new} in {restart_s:.1f} s")
    finally:
        for sock in sockets:
            sock.close(0)
        control.close(0)
        ctx.term()
    reopened_s = door_reopened(daemon)
    answers, took_s = submit_all(daemon.endpoint, photo_files[:20], timeout_s=30)
    assert [a.status for a in answers] == ["ok"] * 20, [a.error for a in answers][:3]
    print(f"FIGURE descriptors: after closing the 400, the door open again in "
          f"{reopened_s:.1f} s, 20 images ok in {took_s:.1f} s")
    assert daemon.stop() == 0, daemon.tail()


# ---------------------------------------------------------------------------------------
# 4. signals to the whole group (SIGHUP: a live reload, tests/daemon/test_reload.py)


@pytest.mark.parametrize(("sig", "to"), [(signal.SIGINT, "process-group"),
                                         (signal.SIGTERM, "process-group")],
                         ids=["SIGINT-process-group", "SIGTERM-process-group"])
def test_group_signals_drain_like_sigterm(tiny_models, photo_files, tmp_path, daemons, sig,
                                          to):
    """SIGINT or SIGTERM mid-stream to the daemon's whole process group (Ctrl-C, systemd's
    stop, `timeout`): it drains like SIGTERM to the front: each of the 100 accepted
    requests answered once and ok, exit status 0, no worker killed or restarted during the
    drain (the workers ignore the group's signal), and none left after the exit (the front
    stops them).

    Before the redesign: SIGHUP's default action ended the front at once (killed by
    SIGHUP, status -1), to the front or to the group: 5-10 of 100 answered when signalled,
    the other 90-95 accepted requests never answered (the issue: 92). SIGHUP now reloads
    the model live (issue 26)."""
    paths = linked_stream(photo_files, tmp_path / "in", 100)
    daemon = daemons(tiny_models["logits"], tmp_path / "masks", tmp_path, *ARGS)
    daemon.wait_ready()
    children = daemon.child_pids()
    raw = RawClient(daemon.endpoint, chunk=100)
    try:
        raw.offer(requests("hup", paths))
        drive(daemon, [raw], lambda: (len(raw.accepted) == 100 and raw.answered >= 5)
              or bool(raw.error_replies), 30, time.monotonic(), "the submit")
        assert len(raw.accepted) == 100, raw.error_replies
        before = raw.answered
        if to == "front":
            daemon.signal(sig)
        else:
            os.killpg(daemon.proc.pid, sig)                  # its own session: the group
        signalled = time.monotonic()
        while daemon.proc.poll() is None and time.monotonic() - signalled < 60:
            raw.step(20)
        code, exit_s = daemon.proc.poll(), time.monotonic() - signalled
        raw.pump(500)
    finally:
        raw.close()
    unanswered = len(raw.accepted - set(raw.results))
    died = [e for e in daemon.events() if e.get("event") == "child died"]
    print(f"\nFIGURE {signal.Signals(sig).name} to the {to}: {before} of 100 answered when "
          f"signalled; daemon "
          f"{exit_text(code)} after {exit_s:.1f} s; {unanswered} "
          f"accepted requests unanswered; {len(died)} children died during the drain")
    assert before < 100, "the stream was over before the signal: nothing to drain"
    assert code == 0, f"daemon {exit_text(code)}; {unanswered} of 100 accepted unanswered"
    assert set(raw.result_count) == raw.accepted and set(raw.result_count.values()) == {1}
    bad = {i: r.error for i, r in raw.results.items() if r.status != wire.OK}
    assert not bad, bad
    assert not died, died
    final = json.loads(daemon.metrics.read_text())
    assert final["front"]["restarts"] == 0 and final["daemon"]["drained"] is True, final
    assert wait_dead(children) == [], "workers outlived the daemon"


# ---------------------------------------------------------------------------------------
# 5. a request id used twice


def test_a_repeated_request_id_gets_one_result(tiny_models, photo_files, tmp_path, daemons):
    """Ids are the client's: the same id twice in one submit, or again while it is pending
    (same path), is one request with one Result. An id reused while pending for another
    path is refused with an error Reply naming the id, never a second Result, and the
    first request's Result comes once.

    Before the redesign: each repeat got its own Result, the error "duplicate request id"
    (sent first), besides the request's ok: Results per id {'twice': 2, 'pending': 2,
    'reused': 2}, and no error Reply for the reuse."""
    paths = linked_stream(photo_files, tmp_path / "in", 130)
    target, other = str(paths[0]), str(paths[1])
    daemon = daemons(tiny_models["logits"], tmp_path / "masks", tmp_path, *ARGS)
    daemon.wait_ready()
    raw = RawClient(daemon.endpoint)

    def submit(*reqs: wire.Request) -> None:
        for r in reqs:
            raw.by_id[r.id] = r
        raw.send_raw(wire.encode(wire.Submit(reqs)))

    def settle(ids: set[str]) -> None:
        drive(daemon, [raw], lambda: ids <= set(raw.results), 60, time.monotonic(),
              f"submitting {sorted(ids)[:3]}...")
        raw.pump(300)                              # a second Result would show here

    try:
        submit(wire.Request("twice", target), wire.Request("twice", target))
        settle({"twice"})
        # pending: queued behind 60 others when the repeat arrives
        backlog = requests("fill1", paths[2:62])
        submit(*backlog, wire.Request("pending", target))
        submit(wire.Request("pending", target))
        settle({"pending", *(r.id for r in backlog)})
        backlog = requests("fill2", paths[62:122])
        submit(*backlog, wire.Request("reused", target))
        submit(wire.Request("reused", other))
        settle({"reused", *(r.id for r in backlog)})
    finally:
        raw.close()
    counts = {i: raw.result_count[i] for i in ("twice", "pending", "reused")}
    refusals = [r for r in raw.error_replies
                if "reused" in r.ids or "reused" in (r.message or "")]
    print(f"\nFIGURE repeated ids: Results per id {counts}; refusal of the reused id: "
          f"{[(r.status, r.ids, r.message) for r in refusals]}; errors "
          f"{ {i: raw.results[i].error for i in counts if raw.results[i].status != wire.OK} }")
    assert counts == {"twice": 1, "pending": 1, "reused": 1}, counts
    for rid in counts:
        assert raw.results[rid].status == wire.OK, raw.results[rid]
    assert raw.results["reused"].path == target, "the reused id answered for the other path"
    assert [r.status for r in refusals] == [wire.ERROR], raw.error_replies
    assert daemon.proc.poll() is None
    assert daemon.stop() == 0, daemon.tail()


# ---------------------------------------------------------------------------------------
# 6. an abstract ipc endpoint


def serving_or_exited(daemon: Daemon, timeout_s: float = 60) -> int | None:
    """The exit status if the daemon exits first; None once it answers a status query."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            return daemon.proc.returncode
        try:
            with Client(daemon.endpoint) as client:
                client.status(timeout_s=0.5)
            return None
        except DaemonUnavailable:
            continue
    raise TimeoutError(f"neither served nor exited within {timeout_s:.0f} s")


def test_abstract_ipc_endpoint_needs_allow_root(tiny_models, photo_files, tmp_path, daemons):
    """`ipc://@name` is a Linux abstract socket: no file, no permissions, so any local user
    can connect. Without --allow-root it is refused like a non-loopback tcp endpoint (exit
    status 2, one line saying so); with --allow-root it serves.

    Before the redesign: it counted as local (every ipc endpoint did): the daemon started
    without --allow-root and answered a status query there."""
    endpoint = f"ipc://@pspnet-test-{uuid.uuid4().hex[:12]}"
    refused = daemons(tiny_models["logits"], tmp_path / "masks", tmp_path, endpoint=endpoint)
    code = serving_or_exited(refused)
    if code is None:
        refused.stop()
        pytest.fail(f"the daemon served {endpoint} without --allow-root: any local user "
                    "can reach it")
    lines = [line for line in refused.log_path.read_text().splitlines() if line.strip()]
    print(f"\nFIGURE abstract endpoint without --allow-root: exit {code}: {lines}")
    assert code == 2, lines
    assert len(lines) == 1 and "--allow-root" in lines[0] and "user" in lines[0], lines

    allowed = tmp_path / "allowed"
    (photo,) = linked_stream(photo_files, allowed, 1)
    daemon = daemons(tiny_models["logits"], tmp_path / "masks", tmp_path, *ARGS,
                     "--allow-root", str(allowed), endpoint=endpoint)
    assert serving_or_exited(daemon) is None, daemon.tail()
    (answer,), _ = submit_all(endpoint, [photo], timeout_s=30)
    assert answer.status == "ok", answer.error
    assert daemon.stop() == 0, daemon.tail()


# ---------------------------------------------------------------------------------------
# 8. issue 23: forged results, heartbeats, pixels and credits; tcp peers without the key

FORGER = """
import json, sys, time
import numpy as np
import zmq
from pspnet.core import wire
cfg = json.loads(sys.argv[1])
ctx = zmq.Context()

def sock(kind, identity=None):
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDTIMEO, 100)
    if identity:
        s.setsockopt(zmq.IDENTITY, identity.encode())
    if cfg["curve"] == "wrong":          # CURVE, with keys of its own
        server_public, _ = zmq.curve_keypair()
        public, secret = zmq.curve_keypair()
        s.curve_serverkey, s.curve_publickey, s.curve_secretkey = server_public, public, secret
    return s

executor, pid = cfg["executor"], cfg["executor_pid"]
controls = []
for identity in (executor, f"{executor}/main/forged", f"postprocess-0-{pid}"):
    c = sock(zmq.DEALER, identity)                # forged notes -> the front's ROUTER
    c.connect(cfg["control"])
    controls.append(c)
fake = ctx.socket(zmq.PULL)                        # a made-up executor's image port
fake_at = fake.bind_to_random_port("tcp://127.0.0.1")
images = sock(zmq.PUSH)                            # forged pixels -> the executor's PULL
images.connect(cfg["images"])
thief = sock(zmq.DEALER, cfg["postprocess"])       # credits -> the executor's ROUTER,
                                                   # under the live worker's name
thief.connect(cfg["outputs"])
side = cfg["side"]
zeros = np.zeros((side, side, 3), np.uint8)
ok = wire.Placement(side, side, 1.0, 0, 0, side, side)
huge = wire.Placement(1 << 20, 1 << 20, 1.0, 0, 0, side, side)
beats = [wire.Heartbeat("executor", 0, pid, {}, fatal="forged: cannot start"),
         wire.Heartbeat("executor", 0, pid, {}, stuck="forged: stuck"),
         wire.Heartbeat("executor", 7, 99999, {}, inputs=f"tcp://127.0.0.1:{fake_at}",
                        outputs=f"tcp://127.0.0.1:{fake_at}", capacity=4096, batch=4)]
sent = {"results": 0, "beats": 0, "images": 0, "credits": 0}
print("forging", flush=True)
end = time.monotonic() + cfg["seconds"]
while time.monotonic() < end:
    for c in controls:
        for beat in beats:
            try:
                c.send_multipart(wire.encode(beat)); sent["beats"] += 1
            except zmq.Again:
                pass
    for n in range(1, cfg["ids"] + 1):
        rid = format(n, "x")
        try:
            controls[n % 3].send_multipart(wire.encode(wire.Result(
                rid, 0, wire.OK, "/forged.jpg", mask="/forged/mask.png", stage="postprocess")))
            sent["results"] += 1
            req = wire.Request(rid, "/forged.jpg")
            images.send_multipart(wire.encode(wire.Image(req, huge if n % 7 == 0 else ok,
                                                         executor, zeros)))
            sent["images"] += 1
        except zmq.Again:
            pass
    try:
        thief.send_multipart(wire.encode(wire.Credit(4096))); sent["credits"] += 1
        images.send(b"x" * (16 << 20))             # over any frame's size: refused unread
    except zmq.Again:
        pass
    time.sleep(0.05)
stolen = fed = 0
while thief.poll(200):
    thief.recv_multipart(); stolen += 1
while fake.poll(200):
    fake.recv_multipart(); fed += 1
print(json.dumps({"sent": sent, "outputs_stolen": stolen, "images_routed_to_fake": fed}),
      flush=True)
"""
ATTACK_S = 6.0
VICTIM_IMAGES = 40


def executor_ports(daemon: Daemon) -> tuple[str, str]:
    """Where executor 0 takes images and hands out outputs, from its "ready" log line
    (what `ss -tln` shows any local user, with tcp)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready = [e for e in daemon.events()
                 if e.get("event") == "ready" and e.get("images") and e.get("index") == 0]
        if ready:
            return ready[-1]["images"], ready[-1]["outputs"]
        time.sleep(0.2)
    raise TimeoutError(f"no executor ready line\n{daemon.tail()}")


def forge_while_a_victim_runs(daemon: Daemon, photos: list[Path], control: str,
                              curve: str = "none", as_user: tuple[str, ...] = (),
                              ) -> tuple[dict, dict]:
    """The victim's images once undisturbed (their masks kept), then again while FORGER
    forges results and heartbeats at `control`, pixels and credits at executor 0's ports:
    each second answer is ok, given once, and its mask is the undisturbed one. Returns
    (the forger's report, the status after)."""
    status = daemon.wait_ready()
    reference, _ = submit_all(daemon.endpoint, photos)
    assert all(a.status == "ok" for a in reference), reference
    expected = {a.path: mask_pixels(a.mask).copy() for a in reference}
    images, outputs = executor_ports(daemon)
    (pid,) = status["stages"]["executor"]["pids"]
    (post,) = status["stages"]["postprocess"]["pids"]
    side = 64                                               # the tiny models' input
    cfg = {"control": control, "images": images, "outputs": outputs, "side": side,
           "executor": f"executor-0-{pid}", "executor_pid": pid,
           "postprocess": f"postprocess-0-{post}", "ids": 2 * len(photos) + 16,
           "seconds": ATTACK_S, "curve": curve}
    forger = subprocess.Popen([*as_user, sys.executable, "-c", FORGER, json.dumps(cfg)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert forger.stdout.readline().strip() == "forging", "the forger did not start"
        victim = Submitter(daemon.endpoint, photos)
        victim.run()
        report = json.loads(forger.stdout.readline())
        assert forger.wait(30) == 0
    finally:
        forger.kill()
    assert victim.error is None, victim.error
    assert daemon.proc.poll() is None, f"daemon {exit_text(daemon.proc.returncode)}"
    counts = collections.Counter(a.path for a in victim.answers)
    assert set(counts.values()) == {1} and len(counts) == len(photos), counts
    bad = [(a.path, a.status, a.mask, a.error) for a in victim.answers if a.status != "ok"]
    assert not bad, bad
    forged = [a.path for a in victim.answers
              if not np.array_equal(mask_pixels(a.mask), expected[a.path])]
    assert not forged, f"{len(forged)} masks are not their image's: {forged[:3]}"
    after = daemon.status()
    assert sum(s["restarts"] for s in after["stages"].values()) == 0, after["stages"]
    assert report["outputs_stolen"] == 0 and report["images_routed_to_fake"] == 0, report
    print(f"\nFIGURE forger sent {report['sent']}: 0 forged answers, 0 stolen outputs, "
          f"0 restarts; front forged_dropped {after['front']['forged_dropped']}, executor "
          f"{after['stages']['executor']['forged_dropped']}, postprocess "
          f"{after['stages']['postprocess']['forged_dropped']}")
    return report, after


def test_same_user_forgeries_on_ipc_are_counted_and_dropped(tiny_models, photo_files,
                                                            tmp_path, daemons):
    """Issue 23, same user on ipc (the 0700 run directory lets it in): forged pixels
    pushed to the executor under the victim's request ids made 192 of 200 masks the
    forger's; a socket on the executor's output claiming 4096 credits received 93 outputs;
    forged results and heartbeats (fatal, stuck, a made-up executor) reached the front; a
    2^20 x 2^20 placement crashed postprocess. Now every such message lacks a token or an
    identity the front handed out: counted, dropped; the victim's answers are its own."""
    daemon = daemons(tiny_models["labels"], tmp_path / "masks", tmp_path, *ARGS)
    daemon.wait_ready()
    (starting,) = [e for e in daemon.events() if e.get("event") == "starting"]
    _, after = forge_while_a_victim_runs(daemon, photo_files[:VICTIM_IMAGES],
                                         f"ipc://{starting['run_dir']}/control")
    assert after["front"]["forged_dropped"] > 0, after["front"]
    assert after["stages"]["executor"]["forged_dropped"] > 0, after["stages"]["executor"]
    assert daemon.stop() == 0, daemon.tail()


def uid_65534() -> tuple[str, ...]:
    if os.geteuid() != 0:
        pytest.skip("another uid needs root to switch to (setpriv --reuid 65534); "
                    "the same-uid variant covers the handshake")
    return ("setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups")


@pytest.mark.parametrize("who", ["same uid, no CURVE", "same uid, another key",
                                 "uid 65534, no CURVE"])
def test_tcp_peers_without_the_key_are_refused_at_the_handshake(tiny_models, photo_files,
                                                                tmp_path, daemons, who):
    """Issue 23, --transport tcp (any local user, or any host with --tcp-host): forged
    results took 104 of 120 answers, one forged `fatal` heartbeat made the daemon exit 3,
    `stuck` ones forced 3 restarts, a made-up executor was routed 64 images, pixels pushed
    to the executor's port made 67 of 120 masks. Every tcp port now speaks CurveZMQ and
    admits only the worker key: nothing of the forger's reaches a stage (0 counted as
    forged: it never got past the handshake), the refusals are logged, once per address
    and reason."""
    as_user = uid_65534() if "65534" in who else ()
    port = 20000 + (os.getpid() * 7 + len(who)) % 20000
    daemon = daemons(tiny_models["labels"], tmp_path / "masks", tmp_path, *ARGS,
                     "--transport", "tcp", "--tcp-base-port", str(port))
    _, after = forge_while_a_victim_runs(
        daemon, photo_files[:VICTIM_IMAGES], f"tcp://127.0.0.1:{port}",
        curve="wrong" if "another key" in who else "none", as_user=as_user)
    assert after["front"]["forged_dropped"] == 0, "a forgery got past the handshake"
    refused = [e for e in daemon.events() if e.get("event") == "refused"]
    assert refused, "no refusal was logged"
    per_peer = collections.Counter((e.get("peer"), e.get("reason"), e.get("pid"))
                                   for e in refused)
    assert max(per_peer.values()) <= 2, per_peer      # rate-limited: not one per attempt
    assert daemon.stop() == 0, daemon.tail()


def test_a_worker_key_holder_cannot_speak_as_one_of_the_fronts_own(tiny_models, photo_files,
                                                                   tmp_path, daemons):
    """A holder of the worker key may join as a remote worker, but not as one of the
    workers the front started: their names are in `pspnet status`, and a "stuck" heartbeat
    under the executor's name made the front stop it (and a new address would have taken
    its pixels). Now the front refuses the name from a remote identity (counted in
    forged_dropped): no restart, every answer its image's."""
    from pspnet.core.keys import Keys, connect_curve
    from pspnet.core.trust import Trust

    keys = tmp_path / "keys"
    subprocess.run([sys.executable, "-m", "pspnet", "keys", str(keys)], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    port = 20000 + (os.getpid() * 17) % 20000
    tcp = daemons(tiny_models["labels"], tmp_path / "masks", tmp_path, *ARGS, "--transport",
                  "tcp", "--tcp-base-port", str(port), "--keys", str(keys))
    status = tcp.wait_ready()
    (pid,) = status["stages"]["executor"]["pids"]
    worker = Keys.for_worker(keys)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)          # -> the front's control ROUTER, as executor 0
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, Trust(worker.token_secret()).identity(f"executor-0-{pid}"))
    connect_curve(sock, worker.server_public, worker.worker_public, worker.worker_secret)
    sock.connect(f"tcp://127.0.0.1:{port}")
    try:
        for _ in range(4):
            sock.send_multipart(wire.encode(wire.Heartbeat(
                "executor", 0, pid, {}, stuck="forged: stuck", inputs="tcp://127.0.0.1:9",
                outputs="tcp://127.0.0.1:9", capacity=64, batch=4)))
            time.sleep(0.5)
        answers, _ = submit_all(tcp.endpoint, photo_files[:8])
        assert sorted(a.status for a in answers) == ["ok"] * 8, answers
        after = tcp.status()
    finally:
        ctx.destroy(linger=0)
    assert after["stages"]["executor"]["pids"] == [pid], after["stages"]["executor"]
    assert sum(s["restarts"] for s in after["stages"].values()) == 0, after["stages"]
    assert after["front"]["forged_dropped"] >= 4, after["front"]
    assert tcp.stop() == 0, tcp.tail()


def test_a_remote_executor_paused_past_liveness_is_fed_again_when_it_comes_back(
        tiny_models, photo_files, tmp_path, daemons):
    """A remote executor stopped longer than --liveness-timeout (a network blip, a long GC
    pause) is forgotten and taken back when it beats again. Before, the postprocess
    worker's new socket to it came under the identity of its old one, which the executor
    still held: the ROUTER refused it, its credits were lost, and the executor waited for
    credits for ever with the requests routed to it (16 of 16 unanswered)."""
    photos = photo_files[:16]
    keys = tmp_path / "keys"
    subprocess.run([sys.executable, "-m", "pspnet", "keys", str(keys)], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    port = 20000 + (os.getpid() * 13) % 20000
    model = tiny_models["labels"]
    tcp = daemons(model, tmp_path / "masks", tmp_path, *ARGS, "--transport", "tcp",
                  "--tcp-base-port", str(port), "--keys", str(keys), "--liveness-timeout", "2")
    remote = subprocess.Popen(
        [sys.executable, "-m", "pspnet", "worker", "executor", "--front", "127.0.0.1",
         "--tcp-base-port", str(port), "--model", str(model), "--batch-size", "4",
         "--index", "100", "--keys", str(keys), "--log-format", "json"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        tcp.wait_ready()
        deadline = time.monotonic() + 60
        while not tcp.status()["remote"] and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.5)
        os.kill(remote.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 30                 # forgotten: silent past 2 s
        while tcp.status()["remote"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not tcp.status()["remote"], "the paused remote executor was not forgotten"
        os.kill(remote.pid, signal.SIGCONT)
        deadline = time.monotonic() + 30                 # and taken back
        while not tcp.status()["remote"] and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.5)
        before = after = tcp.status()["remote"][0]["processed"]
        rounds = 0
        while after == before and rounds < 10:   # until the front routes some to it
            job = Submitter(tcp.endpoint, photos)
            job.start()
            job.wait_for(len(photos), timeout_s=30)
            job.join(5)
            assert sorted(a.status for a in job.answers) == ["ok"] * len(photos), job.answers
            after = tcp.status()["remote"][0]["processed"]
            rounds += 1
        assert after > before, (before, after)            # it was fed again, and answered
        print(f"\nFIGURE remote executor back after a pause: {after - before} images of "
              f"{rounds * len(photos)}, all answered")
    finally:
        remote.kill()
    assert tcp.stop() == 0, tcp.tail()


def test_remote_workers_with_keys_give_the_masks_of_ipc_and_without_are_refused(
        tiny_models, photo_files, tmp_path, daemons):
    """Issue 23: workers on other hosts are what tcp is for. With the worker key (copied
    from the daemon's `pspnet keys DIR`) a remote executor and a remote postprocess join
    over tcp on loopback and the masks are those of an ipc daemon; a worker with another
    key is refused at the handshake (never listed, the daemon unaffected), and one
    without --keys is refused at once, in one line, exit 2."""
    photos = photo_files[:VICTIM_IMAGES]
    model = tiny_models["labels"]
    ipc = daemons(model, tmp_path / "ipc-masks", tmp_path, *ARGS)
    ipc.wait_ready()
    reference, _ = submit_all(ipc.endpoint, photos)
    expected = {a.path: mask_pixels(a.mask).copy() for a in reference}
    assert ipc.stop() == 0, ipc.tail()

    keys, other = tmp_path / "keys", tmp_path / "other-keys"
    for folder in (keys, other):
        subprocess.run([sys.executable, "-m", "pspnet", "keys", str(folder)], check=True,
                       cwd=REPO, stdout=subprocess.DEVNULL)
    assert {p.name: p.stat().st_mode & 0o777 for p in keys.iterdir()} == {
        f"{n}.{s}": 0o600 for n in ("server", "worker", "client") for s in ("key", "key_secret")}
    port = 20000 + (os.getpid() * 11) % 20000
    tcp = daemons(model, tmp_path / "tcp-masks", tmp_path, *ARGS, "--transport", "tcp",
                  "--tcp-base-port", str(port), "--keys", str(keys))
    common = ["--front", "127.0.0.1", "--tcp-base-port", str(port), "--model", str(model),
              "--batch-size", "4", "--log-format", "json", "--out", str(tmp_path / "tcp-masks")]
    without = subprocess.run([sys.executable, "-m", "pspnet", "worker", "executor", *common],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert without.returncode == 2 and len(without.stderr.strip().splitlines()) == 1, \
        without.stderr
    assert "--keys" in without.stderr
    remotes = [subprocess.Popen([sys.executable, "-m", "pspnet", "worker", stage, *common,
                                 "--index", str(index), "--keys", str(folder)],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for stage, index, folder in (("executor", 100, keys), ("postprocess", 101, keys),
                                            ("executor", 102, other), ("preprocess", 103, keys))]
    try:
        tcp.wait_ready()
        deadline = time.monotonic() + 60
        while len(tcp.status()["remote"]) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.5)       # the postprocess workers told where the executors are
        answers, _ = submit_all(tcp.endpoint, photos)
        assert sorted(a.status for a in answers) == ["ok"] * len(photos), answers
        differ = [a.path for a in answers
                  if not np.array_equal(mask_pixels(a.mask), expected[a.path])]
        assert not differ, f"{len(differ)} masks differ from ipc's: {differ[:3]}"
        time.sleep(1.5)                                   # one more heartbeat
        status = tcp.status()
        joined = {r["index"]: r for r in status["remote"]}
        assert set(joined) == {100, 101, 103}, status["remote"]   # 102's key was refused
        assert joined[100]["processed"] + status["stages"]["executor"]["processed"] \
            == len(photos)
        # each remote stage was given work: the front sends to a remote worker under the
        # identity it proved (the worker key's), not the one its own workers use
        assert all(joined[i]["processed"] > 0 for i in (100, 101, 103)), status["remote"]
        assert remotes[2].poll() is None or remotes[2].returncode != 0
        assert any(e.get("event") == "refused" for e in tcp.events()), tcp.tail()
        print(f"\nFIGURE remote executor {joined[100]['processed']} images, remote "
              f"postprocess {joined[101]['processed']}, remote preprocess "
              f"{joined[103]['processed']}; masks = ipc's; other key refused")
    finally:
        for remote in remotes:
            remote.kill()
    assert tcp.stop() == 0, tcp.tail()
