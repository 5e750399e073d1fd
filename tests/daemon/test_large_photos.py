"""A phone's large photo through the daemon: what a preprocess worker keeps of it."""

from __future__ import annotations

import time

from pspnet.daemon.client import Client
from pspnet.stages.child import POLL_S
from tests.kit import proc_kb
from tests.photos import huge_jpeg

SIDE = 5000                                 # 25 Mpx: 75 MB of RGB in the decode scratch


def test_an_idle_preprocess_worker_holds_no_photo(tiny_models, tmp_path, daemons) -> None:
    """A 25 Mpx JPEG is decoded into the worker's scratch (kept from photo to photo while
    it works); once its poll has found nothing to do, the scratch is given back: its
    resident memory is back within half the photo's RGB of where it was before."""
    photo = huge_jpeg(tmp_path / "big.jpg", side=SIDE)
    daemon = daemons(tiny_models["logits"], tmp_path / "masks", tmp_path,
                     "--preprocess-workers", "1", "--postprocess-workers", "1")
    (pid,) = daemon.wait_ready()["stages"]["preprocess"]["pids"]
    before = proc_kb(pid) / 1024
    with Client(daemon.endpoint) as client:
        (answer,) = list(client.submit([photo], timeout_s=300))
    assert answer.status == "ok", answer.error
    time.sleep(3 * POLL_S)
    after = proc_kb(pid) / 1024
    print(f"\nFIGURE preprocess worker RSS before {before:.0f} MB, idle after a "
          f"{SIDE} x {SIDE} JPEG {after:.0f} MB")
    assert after < before + SIDE * SIDE * 3 / 2**20 / 2
    assert daemon.stop() == 0, daemon.tail()
