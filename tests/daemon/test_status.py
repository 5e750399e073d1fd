"""The typed status document (core/status.py, issue 25): every counter the code keeps is
declared, every declared metric reaches /metrics, the JSON keys clients read stay.

Before it, a counter reached `pspnet status` and /metrics only if a tuple in the front
named it: the executor's `stale_dropped` was counted and never shown."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import zmq

from pspnet.core import wire
from pspnet.core.status import (
    REQUESTS,
    ClientCounts,
    DaemonStatus,
    FrontCounts,
    FrontStatus,
    RemoteWorker,
    StageStatus,
    Status,
    Tally,
    WorkerFigures,
    figures,
    summed,
)
from pspnet.daemon.exporter import declared

REPO = Path(__file__).resolve().parents[2]
# the keys `pspnet status`, --metrics-json, the bench and the tests read (the document's
# shape before it was typed): they must all stay
FRONT_KEYS = {"queued", "inflight", "at", "cpu_s", "bytes_in", "bytes_out", "bytes_per_image",
              "restarts", "submitted", "ok", "errors", "retried", "duplicates_dropped",
              "malformed", "abandoned"}
STAGE_KEYS = {"processes", "alive", "restarts", "pids", "processed", "errors", "queue",
              "busy_s", "cpu_s", "batches", "filler"}
DAEMON_KEYS = {"pid", "endpoint", "stopping", "watch", "client_connections",
               "accepting_connections", "client_connections_cap", "busy_replies", "refused",
               "malformed", "client_errors", "bytes_in", "bytes_out", "drained", "abandoned",
               "failure"}


def names_counted(folder: str, call: str) -> set[str]:
    """Keyword names passed to `<x>.<call>(...)` anywhere under a folder (stage counters)."""
    out = set()
    for path in (REPO / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == call):
                out |= {k.arg for k in node.keywords if k.arg}
    return out


def keys_tallied(path: str, attribute: str) -> set[str]:
    """String keys used as `self.<attribute>[...]` in a file (the front's and door's)."""
    out = set()
    for node in ast.walk(ast.parse((REPO / path).read_text())):
        if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute)
                and node.value.attr == attribute):
            for const in ast.walk(node.slice):
                if isinstance(const, ast.Constant) and isinstance(const.value, str):
                    out.add(const.value)
    return out


def test_every_counter_the_code_keeps_is_declared():
    worker = {name for name, _ in figures(WorkerFigures)}
    counted = names_counted("stages", "count")
    assert {"processed", "errors", "busy_s", "batches", "filler", "stale_dropped"} <= counted
    assert counted <= worker, f"counted by a stage, never shown: {counted - worker}"
    tallied = keys_tallied("daemon/front.py", "totals") | keys_tallied("daemon/answers.py",
                                                                       "totals")
    assert {"submitted", "ok", "errors", "abandoned"} <= tallied
    assert tallied <= {n for n, _ in figures(FrontCounts)}
    counts = keys_tallied("daemon/clients.py", "counts")
    assert {"busy_replies", "refused", "malformed"} <= counts
    assert counts <= {n for n, _ in figures(ClientCounts)}


def test_a_tally_takes_only_declared_names():
    totals = Tally(FrontCounts)
    totals["ok"] += 2
    assert totals["ok"] == 2 and set(totals) == {n for n, _ in figures(FrontCounts)}
    with pytest.raises(KeyError, match="not a figure of FrontCounts"):
        totals["okay"] = 1
    with pytest.raises(KeyError):
        totals["okay"] += 1


def sample_status() -> Status:
    front = Tally(FrontCounts)
    front.update(submitted=10, ok=7, errors=2, abandoned=1)
    clients = Tally(ClientCounts)
    clients.update(refused=3, busy_replies=4)
    stages = {stage: StageStatus(**summed([{"processed": 5, "stale_dropped": 1,
                                            "batches": 2, "filler": 3}],
                                          {"processed": 1}),
                                 processes=2, alive=2, restarts=1, pids=[11, 12])
              for stage in ("preprocess", "executor", "postprocess")}
    return Status(stages=stages, front=FrontStatus(**front, queued=1, inflight=2,
                                                   at={"queued": 1, "executor": 2}),
                  remote=[RemoteWorker(**summed([{"processed": 4}]), stage="executor",
                                       index=100, pid=99, seen_s_ago=0.5)],
                  images_per_s=1.5,
                  daemon=DaemonStatus(**clients, pid=1, endpoint="ipc:///x"))


def test_the_document_keeps_every_key_clients_read_and_reads_back():
    status = sample_status()
    doc = json.loads(json.dumps(status.document()))
    assert {"stages", "front", "remote", "images_per_s", "metrics", "daemon"} <= set(doc)
    assert FRONT_KEYS <= set(doc["front"])
    assert all(STAGE_KEYS <= set(s) for s in doc["stages"].values())
    assert DAEMON_KEYS <= set(doc["daemon"])
    assert doc["stages"]["executor"]["processed"] == 6            # live 5 + a dead one's 1
    assert doc["stages"]["executor"]["stale_dropped"] == 1        # no longer lost
    assert doc["remote"][0]["processed"] == 4
    assert Status.from_document(doc) == status
    doc["future"] = {"something": "newer"}                        # a newer daemon's key
    assert Status.from_document(doc) == status
    in_process = Status(stages=status.stages, front=status.front)   # Front alone: no daemon
    assert "daemon" not in in_process.document()
    with pytest.raises(ValueError, match="not a status document"):
        Status.from_document({"front": {}})


def test_every_declared_metric_reaches_the_exporter():
    status = sample_status()
    families = {f.name: f for f in declared(status)}
    wanted = set()
    for section in (FrontStatus, DaemonStatus, StageStatus):
        for _, fig in figures(section):
            if fig.metric is not None:
                wanted.add(fig.metric.name if fig.metric is REQUESTS else fig.metric)
    assert wanted == set(families)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("pspnet_requests_total", (("outcome", "ok"),))] == 7
    assert samples[("pspnet_requests_total", (("outcome", "refused"),))] == 3
    assert samples[("pspnet_requests_abandoned_total", ())] == 1
    assert samples[("pspnet_stage_processed_total", (("stage", "postprocess"),))] == 6
    assert samples[("pspnet_executor_batches_total", ())] == 2      # executor only
    assert samples[("pspnet_executor_stale_dropped_total", ())] == 1
    assert samples[("pspnet_stage_queue", (("stage", "executor"),))] == 0   # a gauge
    assert samples[("pspnet_workers_alive", (("stage", "executor"),))] == 2
    print(f"\nFIGURE /metrics families from core/status.py declarations: {len(families)}")


def test_pspnet_status_refuses_a_reply_that_is_not_a_status(tmp_path):
    """Something at the endpoint answers a status query with a document this version
    cannot read (an older daemon): one line naming it, exit 1, not a traceback."""
    endpoint = f"ipc://{tmp_path}/front"
    ctx = zmq.Context()
    fake = ctx.socket(zmq.ROUTER)           # plays the daemon: status queries in, a reply out
    fake.setsockopt(zmq.LINGER, 0)
    fake.bind(endpoint)

    def answer_once() -> None:
        if fake.poll(30_000):
            client, *_ = fake.recv_multipart()
            fake.send_multipart([client, *wire.encode(wire.Reply("status",
                                                                 body={"front": {}}))])

    thread = threading.Thread(target=answer_once, daemon=True)
    thread.start()
    try:
        out = subprocess.run([sys.executable, "-m", "pspnet", "status", "--endpoint",
                              endpoint], capture_output=True, text=True, timeout=60)
    finally:
        thread.join(5)
        fake.close(0)
        ctx.term()
    assert out.returncode == 1 and out.stdout == "", out
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"pspnet status: error: {endpoint} answered, but not with a "
                           "status this version of pspnet reads"), line
