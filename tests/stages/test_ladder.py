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
