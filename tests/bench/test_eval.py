"""Issue 5: `pspnet eval` on a VOC-layout folder, checked against mmseg's IoUMetric."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from pspnet.batch.progress import Progress
from pspnet.batch.voc import VocLayoutError, read_split
from pspnet.cli import main
from tests.mmseg_metric import mmseg_iou
from tests.voc_folder import make_voc_folder


def voc_id(mask: Path) -> str:
    """The VOC id of a mask that mask_path placed: <id>.jpg.png."""
    return Path(mask.stem).stem


JSON_KEYS = {"mIoU", "aAcc", "mAcc", "per_class", "images", "failed"}


def assert_matches_mmseg(doc: dict, voc, mask_dir: Path) -> None:
    ids = voc.scorable
    found = {voc_id(p): p for p in mask_dir.rglob("*.png")}
    theirs = mmseg_iou([found[i] for i in ids], [voc.truths[i] for i in ids])
    exact = mmseg_iou([found[i] for i in ids], [voc.truths[i] for i in ids],
                      exact_sums=True)
    print(f"eval mIoU {doc['mIoU']:.7f} / IoUMetric {theirs['mIoU']:.7f} "
          f"(float64 sums {exact['mIoU']:.7f})")
    for key in ("mIoU", "aAcc", "mAcc"):
        assert abs(doc[key] - theirs[key]) <= 1e-6 * 100   # 1e-6 as mmseg's fractions
        assert abs(doc[key] - exact[key]) <= 1e-6
    ours = np.array([np.nan if c["IoU"] is None else c["IoU"] for c in doc["per_class"]])
    np.testing.assert_allclose(ours, exact["IoU"], rtol=0, atol=1e-6)


def test_eval_prints_mmseg_table_and_matches_iou_metric(mmseg_models, tmp_path, capsys):
    """The mmseg reference as ground truth source; a missing image, a missing and an
    unreadable ground truth are listed at the end, and the rest is scored exactly."""
    from pspnet.build_model.reference import Reference

    reference = Reference(mmseg_models["logits"])
    voc = make_voc_folder(tmp_path / "voc", predict=reference.predict, missing_image=True,
                          missing_truth=True, broken_truth=True)
    masks, report = tmp_path / "masks", tmp_path / "eval.json"
    code = main(["eval", "--voc", str(voc.root), "--model", str(mmseg_models["logits"]),
                 "--batch-size", "4", "--preprocess-workers", "1", "--postprocess-workers",
                 "1", "--out", str(masks), "--json", str(report)])
    out, err = capsys.readouterr()
    print(out)
    assert code == 0
    assert "per class results:" in out and "|  aeroplane  |" in out
    assert "aAcc:" in out and "mIoU:" in out and "mAcc:" in out
    assert "img/s" in err and "ETA" in err                # progress, plain lines
    doc = json.loads(report.read_text())
    assert JSON_KEYS <= set(doc)
    assert doc["images"] == len(voc.scorable) == len(voc.ids) - 3
    assert f"mIoU: {float(np.round(doc['mIoU'], 2))}" in out
    assert len(doc["per_class"]) == 21 and doc["per_class"][0]["class"] == "background"
    failed = {f["id"]: f["reason"] for f in doc["failed"]}
    assert set(failed) == {*voc.missing_images, *voc.missing_truths, *voc.broken_truths}
    for image_id in failed:                               # ... and printed at the end
        assert image_id in out.split("not scored (")[1]
    assert "image missing" in failed[voc.missing_images[0]]
    assert "ground truth" in failed[voc.broken_truths[0]]
    # masks named after the image id, every image that exists
    assert sorted(voc_id(p) for p in masks.rglob("*.png")) == sorted(voc.images)
    assert 20 < doc["mIoU"] < 100                         # perturbed: not trivially 100
    assert_matches_mmseg(doc, voc, masks)


def test_eval_through_a_running_daemon(tiny_models, tmp_path, capsys, daemons):
    """--endpoint: the daemon writes masks, eval scores them itself and copies them."""
    voc = make_voc_folder(tmp_path / "voc", missing_image=True, broken_truth=True)
    daemon = daemons(tiny_models["logits"], tmp_path / "daemon-masks", tmp_path,
                     "--batch-size", "4", "--preprocess-workers", "1",
                     "--postprocess-workers", "1")
    try:
        daemon.wait_ready()
        masks, report = tmp_path / "masks", tmp_path / "eval.json"
        code = main(["eval", "--voc", str(voc.root), "--model", str(tiny_models["logits"]),
                     "--endpoint", daemon.endpoint, "--out", str(masks),
                     "--json", str(report)])
        status = daemon.status()
    finally:
        assert daemon.stop() == 0, daemon.logs()
    out, _ = capsys.readouterr()
    assert code == 0 and "per class results:" in out
    doc = json.loads(report.read_text())
    assert doc["images"] == len(voc.scorable)
    assert {f["id"] for f in doc["failed"]} == {*voc.missing_images, *voc.broken_truths}
    assert sorted(voc_id(p) for p in masks.rglob("*.png")) == sorted(voc.images)
    assert status["metrics"] is None       # ground truth stayed here, not in the daemon
    assert_matches_mmseg(doc, voc, masks)


def test_eval_usage_errors(tiny_models, tmp_path, capsys):
    assert main(["eval", "--voc", str(tmp_path), "--model", str(tiny_models["logits"])]) == 2
    assert "no such split file" in capsys.readouterr().err
    voc = make_voc_folder(tmp_path / "voc", photos=[])
    assert main(["eval", "--voc", str(voc.root), "--model", str(tiny_models["logits"])]) == 2
    capsys.readouterr()
    # VOCdevkit/ given for VOCdevkit/VOC2012/: the line names the folder that has the split
    assert main(["eval", "--voc", str(tmp_path), "--model", str(tiny_models["logits"])]) == 2
    assert capsys.readouterr().err.strip().endswith(f"has it: pass --voc {voc.root}")


def test_read_split_notes_what_is_missing(tmp_path):
    voc = make_voc_folder(tmp_path, photos=_two_photos(), missing_image=True,
                          missing_truth=True)
    (tmp_path / "ImageSets/Segmentation/val.txt").write_text(
        "\n".join([*voc.ids, voc.ids[1], "", "../escape"]) + "\n")
    split = read_split(tmp_path)
    assert [i.id for i in split.items] == voc.ids[:2]
    assert split.items[0].truth is None and split.items[1].truth is not None
    reasons = {m["id"]: m["reason"] for m in split.missing}
    assert reasons[voc.missing_images[0]] == "image missing"
    assert "ground truth missing" in reasons[voc.missing_truths[0]]
    assert "not a plain file name" in reasons["../escape"]
    assert split.listed == 4
    with pytest.raises(VocLayoutError):
        read_split(tmp_path, "train")


def test_progress_plain_lines_when_not_a_tty():
    """tqdm draws the line; off a terminal each refresh is a whole line, no carriage
    return, no blank line, and the final line is the complete count."""
    stream = io.StringIO()
    bar = Progress(3, label="eval ", stream=stream)
    bar.update()
    bar.update(failed=1)
    bar.update()
    bar.close()
    text = stream.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and "" not in lines
    assert lines[0].startswith("eval 0/3") and lines[-1].startswith("eval 3/3 (100.0%)")
    assert "img/s" in lines[-1] and "ETA 00:00" in lines[-1] and "1 failed" in lines[-1]
    on_a_tty = io.StringIO()
    bar = Progress(2, label="eval ", stream=on_a_tty, tty=True)
    bar.update(2)
    bar.close()
    assert "\r" in on_a_tty.getvalue()                # redrawn in place


def _two_photos() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [(f"p{k}.jpg", rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)) for k in range(2)]
