"""Issue 18: the pictures for people (batch/report.py) and `pspnet eval --report DIR`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pspnet.batch.report import (
    Row,
    blend,
    class_shares,
    contact_sheet,
    edges,
    iou_bar_chart,
    legend_entries,
    top_classes_line,
)
from pspnet.cli import main
from pspnet.model.manifest import VOC_CLASSES, voc_palette
from tests.voc_folder import make_voc_folder


def test_top_classes_put_objects_first_and_skip_specks():
    labels = np.zeros((100, 100), np.uint8)
    labels[:40] = 15                          # person 40 %
    labels[40:45] = 8                         # cat 5 %
    labels[99, 99] = 9                        # chair 0.01 %: left out of the line
    labels[0, :10] = 255                      # ignore: not counted
    shares = dict(class_shares(labels, 21))
    assert abs(shares[15] - 100 * 3990 / 9990) < 1e-9 and 255 not in shares
    line = top_classes_line(labels, VOC_CLASSES)
    assert line.startswith("person 39.9 %, cat 5.0 %, background")
    assert "chair" not in line


def test_every_class_of_a_mask_is_in_its_legend(tmp_path):
    """Issue 24: the sheet outlines every region, so every class gets a legend entry,
    however small (it used to leave out classes under 0.1 % and all past the sixth)."""
    labels = np.zeros((200, 200), np.uint8)
    for k in range(1, 12):                     # eleven object classes, 1 % down to a pixel
        labels[k * 10:k * 10 + max(1, 40 - 4 * k), :10] = k
    labels[199, 199] = 20                      # tvmonitor: one pixel, 0.0025 %
    entries = legend_entries(labels, VOC_CLASSES)
    assert sorted(k for k, _ in entries) == sorted(set(np.unique(labels).tolist()))
    assert entries[-1][1].startswith("background") and "(not painted)" in entries[-1][1]
    assert dict(entries)[20] == "tvmonitor  <0.1 %"
    sheet = contact_sheet([Row("many", np.zeros((200, 200, 3), np.uint8), labels)],
                          VOC_CLASSES, voc_palette(21), tmp_path / "sheet.png")
    assert Image.open(sheet).size[0] == 1200


def test_blend_paints_objects_and_outlines_them_but_not_the_background():
    photo = np.full((20, 20, 3), 100, np.uint8)
    labels = np.zeros((20, 20), np.uint8)
    labels[5:15, 5:15] = 15
    out = blend(photo, labels, voc_palette(21), alpha=0.5)
    assert (out[0, 0] == 100).all()                          # background: the photo
    person = np.asarray(voc_palette(21)[15])
    assert np.array_equal(out[10, 10], np.round((100 + person) / 2).astype(np.uint8))
    assert edges(labels)[5, 10] and edges(labels)[4, 10] and not edges(labels)[10, 10]
    assert (out[5, 10] == 255).all()                         # outlined in white


def test_eval_report_writes_the_overlays_and_the_bar_chart(tiny_models, tmp_path, capsys):
    voc = make_voc_folder(tmp_path / "voc")
    report = tmp_path / "report"
    code = main(["eval", "--voc", str(voc.root), "--model", str(tiny_models["logits"]),
                 "--batch-size", "4", "--preprocess-workers", "1", "--postprocess-workers",
                 "1", "--report", str(report)])
    out = capsys.readouterr().out
    assert code == 0
    assert f"report: {report / 'overlays.png'}" in out
    assert f"report: {report / 'per-class-iou.png'}" in out
    masks = (report / "masks").rglob("*.png")
    assert sorted(Path(p.stem).stem for p in masks) == sorted(voc.images)
    with Image.open(report / "overlays.png") as sheet:
        assert sheet.format == "PNG" and sheet.height > 150 * len(voc.scorable)
    with Image.open(report / "per-class-iou.png") as chart:
        assert chart.format == "PNG"


def test_eval_report_refuses_no_masks(tiny_models, tmp_path, capsys):
    voc = make_voc_folder(tmp_path / "voc")
    assert main(["eval", "--voc", str(voc.root), "--model", str(tiny_models["logits"]),
                 "--report", str(tmp_path / "r"), "--no-masks"]) == 2
    assert "--report draws the masks" in capsys.readouterr().err


def test_iou_bar_chart_marks_absent_classes(tmp_path):
    per_class = [{"class": "background", "IoU": 90.0}, {"class": "cat", "IoU": float("nan")}]
    path = iou_bar_chart(per_class, tmp_path / "chart.png", title="t")
    with Image.open(path) as im:
        assert im.width > 100
