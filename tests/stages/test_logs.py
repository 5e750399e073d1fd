"""Log lines: one write per record (processes share stderr), strict JSON (no NaN)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from pspnet.core.logs import configure_logging


class Recorder:
    """A stderr stand-in that keeps each write call separately."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
    structlog.contextvars.clear_contextvars()


def record_stderr(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """Called in the test itself: pytest's capture resets sys.stderr after set-up."""
    recorder = Recorder()
    monkeypatch.setattr(sys, "stderr", recorder)
    return recorder


def strict(line: str) -> dict:
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(line, parse_constant=refuse)


@pytest.mark.parametrize("as_json", [True, False])
def test_a_record_is_one_write_ending_in_a_newline(monkeypatch: pytest.MonkeyPatch,
                                                    as_json: bool) -> None:
    stderr = record_stderr(monkeypatch)
    configure_logging("info", as_json, stage="postprocess", index=0, pid=714)
    structlog.get_logger().info("ready", masks="/tmp/m")
    structlog.get_logger().warning("second", n=2)
    assert len(stderr.writes) == 2
    for text in stderr.writes:
        assert text.endswith("\n") and text.count("\n") == 1
    if as_json:
        assert strict(stderr.writes[0])["pid"] == 714


def test_nan_and_infinity_render_as_null(monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = record_stderr(monkeypatch)
    configure_logging("info", json=True)
    nan, inf = float("nan"), float("inf")
    structlog.get_logger().info("exit", metrics={
        "mIoU": nan, "aAcc": 97.5, "per_class": [{"class": "cat", "IoU": nan, "Acc": -inf}]},
        ratio=inf, pair=(nan, 1.0))
    (line,) = stderr.writes
    doc = strict(line)
    assert doc["metrics"] == {"mIoU": None, "aAcc": 97.5,
                              "per_class": [{"class": "cat", "IoU": None, "Acc": None}]}
    assert doc["ratio"] is None and doc["pair"] == [None, 1.0]


def test_json_safe() -> None:
    from pspnet.core.logs import json_safe

    assert json_safe({"a": [float("nan"), float("-inf"), 1.5, "nan"], "b": (2, None)}) == {
        "a": [None, None, 1.5, "nan"], "b": [2, None]}


WRITER = """
import os, structlog
from pspnet.core.logs import configure_logging
configure_logging("info", json=True, pid=os.getpid())
log = structlog.get_logger()
for i in range(300):
    log.info("tick", i=i, pad="x" * 1500)
"""


def test_processes_sharing_a_pipe_never_split_a_line() -> None:
    """Unbuffered stderr (as the tests' daemons run) makes every write call a write(2)."""
    read_end, write_end = os.pipe()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER], stderr=write_end, env=env,
                              cwd=Path(__file__).parents[2])
             for _ in range(4)]
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    assert all(p.wait(60) == 0 for p in procs)
    lines = data.decode().splitlines()
    assert len(lines) == 4 * 300
    assert all(strict(line)["event"] == "tick" for line in lines)
