"""The work-conserving batch rule alone, on an injected clock: no processes, no sleeps."""

from __future__ import annotations

import pytest

from pspnet.stages.batcher import Batcher, Step, size_for


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fill(batcher: Batcher, n: int) -> None:
    batcher.begin()
    for _ in range(n):
        batcher.took()


def test_size_for_picks_the_smallest_built_size_that_holds_the_images():
    sizes = [1, 4, 16]
    assert [size_for(n, sizes) for n in (1, 2, 4, 5, 16, 17, 40)] == [1, 4, 4, 16, 16, 16, 16]
    assert size_for(3, [8]) == 8
    with pytest.raises(ValueError):
        size_for(1, [])


def test_a_lone_image_on_an_idle_device_runs_at_once_at_the_smallest_size():
    clock = Clock()
    batcher = Batcher([1, 4], max_wait_ms=20, clock=clock)
    fill(batcher, 1)
    step = batcher.next(queued=1, arrived=False, device_busy=False)
    assert step == Step(run=True, size=1, waited_s=0.0)


def test_an_idle_device_first_reads_what_has_arrived_then_runs_it_all():
    batcher = Batcher([1, 4, 16], max_wait_ms=20, clock=Clock())
    fill(batcher, 1)
    assert batcher.next(queued=1, arrived=True, device_busy=False) == Step(run=False,
                                                                          wait_s=0.0)
    fill(batcher, 3)
    assert batcher.next(queued=3, arrived=False, device_busy=False).size == 4


def test_a_full_batch_runs_at_the_largest_size_busy_or_not():
    batcher = Batcher([16, 4, 1, 4], max_wait_ms=20, clock=Clock())
    assert batcher.sizes == [1, 4, 16]
    fill(batcher, 16)
    for busy in (False, True):
        assert batcher.next(queued=16, arrived=True, device_busy=busy).size == 16


def test_nothing_queued_waits_for_an_image_without_a_bound():
    batcher = Batcher([4], max_wait_ms=20, clock=Clock())
    batcher.begin()
    assert batcher.next(queued=0, arrived=False, device_busy=False) == Step(run=False)
    assert batcher.next(queued=0, arrived=False, device_busy=True) == Step(run=False)


def test_while_the_device_is_busy_a_partial_batch_fills_until_max_wait():
    clock = Clock()
    batcher = Batcher([1, 4], max_wait_ms=20, clock=clock)
    fill(batcher, 2)
    step = batcher.next(queued=2, arrived=False, device_busy=True)
    assert not step.run and step.wait_s == pytest.approx(0.020)
    clock.now += 0.015
    step = batcher.next(queued=2, arrived=False, device_busy=True)
    assert not step.run and step.wait_s == pytest.approx(0.005)
    clock.now += 0.005
    step = batcher.next(queued=2, arrived=False, device_busy=True)
    assert step.run and step.size == 4 and step.waited_s == pytest.approx(0.020)


def test_the_device_freeing_runs_the_partial_batch_before_max_wait():
    clock = Clock()
    batcher = Batcher([1, 4], max_wait_ms=20, clock=clock)
    fill(batcher, 1)
    assert not batcher.next(queued=1, arrived=False, device_busy=True).run
    clock.now += 0.003
    step = batcher.next(queued=1, arrived=False, device_busy=False)
    assert step.run and step.size == 1 and step.waited_s == pytest.approx(0.003)


def test_a_new_batch_starts_its_own_wait():
    clock = Clock()
    batcher = Batcher([4], max_wait_ms=20, clock=clock)
    fill(batcher, 1)
    clock.now += 1.0
    fill(batcher, 1)                          # begin() forgot the old batch's first image
    assert batcher.next(queued=1, arrived=False, device_busy=True).wait_s == \
        pytest.approx(0.020)


def test_bad_sizes_are_refused():
    for sizes in ([], [0, 4]):
        with pytest.raises(ValueError):
            Batcher(sizes, max_wait_ms=20)
