"""Fixtures of the stage tests: eager references of the tiny models, the aclruntime stand-in."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pspnet.model.serving_model import ServingModel
from tests.kit import FAKE_ACL
from tests.tiny_model import MEAN, STD, tiny_core

FAKE_KNOBS = ("FAKE_ACLRUNTIME_RELEASE", "FAKE_ACLRUNTIME_EXECUTE_MS",
              "FAKE_ACLRUNTIME_NO_BASETENSOR", "FAKE_ACLRUNTIME_DEVICES")


@pytest.fixture(scope="session")
def references() -> dict[str, ServingModel]:
    """Eager references of the session's tiny models (tests/conftest.py: seed 0, 64x64)."""
    core = tiny_core()
    return {head: ServingModel(core, MEAN, STD, head) for head in ("logits", "labels")}


class FakeAcl:
    """The stand-in's knobs (environment variables: the backend's session process is a
    fresh interpreter) and its trace of binding calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, trace: Path) -> None:
        self._monkeypatch = monkeypatch
        self.trace_path = trace

    def configure(self, release: str = "2025", execute_ms: float = 0,
                  base_tensor: bool = True) -> None:
        self._monkeypatch.setenv("FAKE_ACLRUNTIME_RELEASE", release)
        self._monkeypatch.setenv("FAKE_ACLRUNTIME_EXECUTE_MS", str(execute_ms))
        self._monkeypatch.setenv("FAKE_ACLRUNTIME_NO_BASETENSOR", "0" if base_tensor else "1")
        sys.modules.pop("aclruntime", None)

    def module(self) -> Any:
        """The stand-in imported here, as configured (for tests of the stand-in itself)."""
        sys.modules.pop("aclruntime", None)
        import aclruntime
        return aclruntime

    def events(self, op: str | None = None) -> list[dict[str, Any]]:
        """Binding calls so far, in order of their start (CLOCK_MONOTONIC, any process)."""
        if not self.trace_path.exists():
            return []
        events = [json.loads(line) for line in self.trace_path.read_text().splitlines()]
        return sorted((e for e in events if op is None or e["op"] == op),
                      key=lambda e: e["start"])


@pytest.fixture
def fake_acl(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeAcl]:
    """`import aclruntime` gets the stand-in, here and in the acl backend's session process
    (which takes this process's sys.path); the 2025 release unless configured otherwise."""
    monkeypatch.syspath_prepend(str(FAKE_ACL))
    for knob in FAKE_KNOBS:
        monkeypatch.delenv(knob, raising=False)
    trace = tmp_path / "aclruntime-trace.jsonl"
    monkeypatch.setenv("FAKE_ACLRUNTIME_TRACE", str(trace))
    sys.modules.pop("aclruntime", None)
    yield FakeAcl(monkeypatch, trace)
    sys.modules.pop("aclruntime", None)
