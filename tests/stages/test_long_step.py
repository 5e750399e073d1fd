"""Issue 23 item 6: a long step of a work loop is vouched for within its budget, then
reported stuck (stages/child.py `Child.long_step`). The front is played by a ROUTER."""

from __future__ import annotations

import time

import zmq

from pspnet.core import wire
from pspnet.core.config import Addresses, PipelineConfig
from pspnet.core.trust import Trust, new_secret
from pspnet.stages.child import STEP_S_PER_MPX, Child

LIVENESS_S = 1.0
PIXELS = 1_000_000
BUDGET_S = LIVENESS_S + PIXELS / 1e6 * STEP_S_PER_MPX


def test_a_long_step_is_vouched_for_within_its_budget_then_reported_stuck(tiny_models,
                                                                         tmp_path):
    """The loop sits in one step (a sleep standing for a 1 Mpx decode) past its budget:
    while inside the budget, heartbeats come from the worker's helper socket with nothing
    stuck; after it, they say the step is stuck (the front then restarts the worker); once
    the step ends, the helper falls silent (the loop beats itself again)."""
    cfg = PipelineConfig(model_dir=tiny_models["logits"], run_dir=tmp_path, log_json=True,
                         liveness_timeout_s=LIVENESS_S, heartbeat_s=0.1)
    addrs = Addresses.for_config(cfg, tmp_path)
    ctx = zmq.Context.instance()
    front = ctx.socket(zmq.ROUTER)          # the worker's heartbeats -> this test
    front.bind(addrs.control)
    trust = Trust(new_secret())
    child = Child("preprocess", 0, cfg, addrs, trust, supervised=False)
    started = time.monotonic()
    with child.long_step("decode", PIXELS):
        time.sleep(BUDGET_S + 1.5)
    ended = time.monotonic()
    beats: list[wire.Heartbeat] = []
    while front.poll(300):                  # what was sent during the step
        identity, *frames = front.recv_multipart()
        message = wire.decode(frames)
        assert identity == trust.identity(child.name, "vouch")   # its proven helper socket
        assert isinstance(message, wire.Heartbeat) and message.pid == child.pid
        beats.append(message)
    time.sleep(0.5)
    after = front.poll(0)                   # the step is over: the helper is silent
    front.close(0)
    assert not after, "the helper still beats after the step"
    stuck = [b for b in beats if b.stuck]
    assert len(beats) > len(stuck) > 0, [b.stuck for b in beats]
    assert all("decode" in b.stuck for b in stuck)
    # within the budget nothing is stuck: the first stuck beat says how long it had been
    first = stuck[0].stuck
    assert float(first.split(" for ")[1].split(" s")[0]) >= BUDGET_S, first
    print(f"\nFIGURE long step: {len(beats) - len(stuck)} beats vouched, then {len(stuck)} "
          f"stuck ({first}); step {ended - started:.1f} s")
