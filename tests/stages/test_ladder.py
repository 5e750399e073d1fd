"""The ladder of batch sizes: each batch runs on the smallest built size that holds it,
with the outputs the full-size backend gives for the same rows."""

from __future__ import annotations

import numpy as np
import pytest

from pspnet.stages.backends import open_backend
from pspnet.stages.backends.ladder import Ladder, open_ladder
from pspnet.stages.batcher import size_for


@pytest.mark.parametrize("kind", ["ort", "torch"])
def test_a_partial_batch_runs_on_the_smallest_size_and_matches_the_full_one(tiny_models,
                                                                            kind):
    model = tiny_models["labels"]
    ladder = open_ladder(kind, model, [1, 4, 16], 4, device="cpu", precision="fp32",
                         options={})
    full = open_backend(kind, model, 4)
    assert ladder.sizes == [1, 4] and ladder.batch_size == 4
    rng = np.random.default_rng(0)
    for n in (1, 3, 4):
        size = size_for(n, ladder.sizes)
        images, boxes = ladder.host_buffers(0)
        images[:] = 0
        boxes[:] = 0
        images[:n] = rng.integers(0, 255, (n, *images.shape[1:]), dtype=np.uint8)
        boxes[:n] = (0, 0, 64, 64)
        ladder.upload(0, images[:size], boxes[:size])
        ladder.launch(0)
        out = ladder.collect(0)
        assert out.shape[0] == size
        full_images, full_boxes = full.host_buffers(0)
        full_images[:], full_boxes[:] = images, boxes
        full.upload(0, full_images, full_boxes)
        np.testing.assert_array_equal(out[:n], full.execute(0)[:n])
    times = ladder.execute_times_ms
    assert len(times) == 3 and all(b.execute_times_ms is times for b in ladder.by_size.values())
    ladder.close()
    full.close()


def test_the_lone_image_rung_spins_within_a_run_and_the_others_sleep(tiny_models):
    """With the plan's sleeping threads, the batch-size-1 rung below the top gets
    run_spin (a lone image on an idle executor pays no wake-up per operator); the full
    batch keeps threads that sleep, and a ladder of size 1 alone runs as the plan says."""
    options = {"threads": "2", "spin": "0"}
    ladder = open_ladder("ort", tiny_models["labels"], [1, 4], 4, device="cpu",
                         precision="fp32", options=options)
    spins = {size: (entry(backend, "session.intra_op.allow_spinning"),
                    entry(backend, "session.force_spinning_stop"))
             for size, backend in ladder.by_size.items()}
    assert spins == {1: ("1", "1"), 4: ("0", None)}
    ladder.close()
    alone = open_ladder("ort", tiny_models["labels"], [1, 4], 1, device="cpu",
                        precision="fp32", options=options)
    assert (entry(alone.by_size[1], "session.intra_op.allow_spinning"),
            entry(alone.by_size[1], "session.force_spinning_stop")) == ("0", None)
    alone.close()


def entry(backend, key: str) -> str | None:
    """A session config entry of an ort backend; None where it was never set."""
    try:
        return backend._session.get_session_options().get_session_config_entry(key)
    except RuntimeError:
        return None


def test_a_size_the_ladder_does_not_run_is_refused(tiny_models):
    ladder = open_ladder("sim", tiny_models["labels"], [1, 4, 16], 16, device="sim",
                         precision="fp32", options={"img_s": "100000"})
    images, boxes = ladder.host_buffers(1)
    with pytest.raises(ValueError, match="batch of 3"):
        ladder.upload(1, images[:3], boxes[:3])
    with pytest.raises(RuntimeError, match="no batch pending"):
        ladder.collect(1)
    with pytest.raises(ValueError):
        Ladder({})
    ladder.close()
