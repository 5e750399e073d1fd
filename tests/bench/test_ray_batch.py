"""Issue 17: `pspnet batch` (Ray Data) gives what the daemon gives: the same mask bytes,
the same mIoU and the same failures, on the sample photos and on a VOC-layout folder.

One local Ray instance (2 CPUs, no dashboard) serves the whole module; the tiny models of
tests/conftest.py keep each job to seconds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import pytest

from pspnet.batch import ray_batch
from pspnet.batch.folder import from_folder
from pspnet.build_model.samples import SAMPLE_DIR
from pspnet.cli import main
from tests.voc_folder import make_voc_folder

COMPARED = ("mIoU", "aAcc", "mAcc", "per_class", "images", "listed", "segmented", "failed")


@pytest.fixture(scope="module")
def ray_session():
    import ray

    started = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    print(f"FIGURE ray.init {time.monotonic() - started:.1f} s")
    yield ray
    ray.shutdown()


def corrupt_jpeg(path: Path) -> Path:
    """A JPEG cut off half way: the decoder refuses it, the job goes on."""
    data = (SAMPLE_DIR / "chelsea_451x300.jpg").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def batch(*args: str) -> int:
    started = time.monotonic()
    code = main(["batch", *args, "--batch-size", "4"])
    print(f"FIGURE pspnet batch {time.monotonic() - started:.1f} s")
    return code


def same_bytes(ours: Path, theirs: Path) -> list[str]:
    """Names of the masks in `theirs`, after checking each has a byte-identical twin."""
    names = sorted(str(p.relative_to(theirs)) for p in theirs.rglob("*.png"))
    assert names == sorted(str(p.relative_to(ours)) for p in ours.rglob("*.png"))
    for name in names:
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name
    return names


def test_batch_masks_are_the_daemons_on_the_sample_photos(ray_session, tiny_models, tmp_path,
                                                           capsys):
    """The shipped sample photos and a broken JPEG, logits head: each mask byte for byte
    what the daemon's pipeline writes; the broken image fails its row with the daemon's
    own reason, and the job still exits 0."""
    from pspnet.core.config import PipelineConfig
    from pspnet.daemon.front import Front, requests_for

    photos = tmp_path / "photos"
    shutil.copytree(SAMPLE_DIR, photos, ignore=shutil.ignore_patterns("*.txt"))
    bad = corrupt_jpeg(photos / "zz_broken.jpg")
    paths = sorted(photos.glob("*.jpg"))
    model = tiny_models["logits"]

    daemon_masks = tmp_path / "daemon-masks"
    cfg = PipelineConfig(model_dir=model, batch_size=4, preprocess_workers=1,
                         postprocess_workers=1, out_dir=daemon_masks)
    with Front(cfg) as pipe:
        answers = {r.path: r for r in pipe.run(requests_for(paths))}
    assert answers[str(bad)].status == "error"

    ray_masks, report = tmp_path / "ray-masks", tmp_path / "batch.json"
    code = batch("--images", str(photos), "--model", str(model), "--out", str(ray_masks),
                 "--json", str(report))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "img/s" in err and "ETA" in err                  # the progress line
    names = same_bytes(ray_masks, daemon_masks)
    assert len(names) == len(paths) - 1 == 9
    doc = json.loads(report.read_text())
    assert doc["segmented"] == 9 and doc["listed"] == 10 and doc["images"] == 0
    assert doc["failed"] == [{"id": "zz_broken", "path": str(bad),
                              "reason": f"preprocess: {answers[str(bad)].error}"}]
    assert "zz_broken: preprocess: truncated or corrupt JPEG" in out
    assert doc["engine"] == "ray" and doc["resources"]["CPU"] == 2
    # no ground truth: what was written, not a table of nan
    (summary,) = [line for line in out.splitlines() if line.startswith("segmented ")]
    print(summary)
    assert summary.startswith("segmented 9 of 10 images (")
    assert summary.endswith(f"masks in {ray_masks}; 1 failed; no ground truth given, so no "
                            "mIoU")
    assert "nan" not in out and "Class" not in out


def test_batch_and_watch_mode_put_each_mask_in_the_same_place(ray_session, tiny_models,
                                                              photo_files, tmp_path, daemons):
    """Issue 24: one rule (model.masks.mask_path) for watch mode and `pspnet batch`: x.jpg
    beside x.png (one stem) both masked by each, at the same place below each --out, with
    the same bytes."""
    from PIL import Image

    from pspnet.model.masks import mask_path
    from tests.kit import watch_record

    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(photo_files[0], photos / "x.jpg")
    Image.open(photo_files[1]).save(photos / "x.png")
    watch_masks, ray_masks = tmp_path / "watch-masks", tmp_path / "ray-masks"
    daemon = daemons(tiny_models["logits"], watch_masks, tmp_path, "--watch", str(photos),
                     "--batch-size", "4", "--preprocess-workers", "1")
    try:
        daemon.wait_ready()
        deadline = time.monotonic() + 60
        while len(watch_record(watch_masks)) < 2:
            assert time.monotonic() < deadline, daemon.logs()
            time.sleep(0.1)
    finally:
        assert daemon.stop() == 0, daemon.logs()
    assert batch("--images", str(photos), "--model", str(tiny_models["logits"]),
                 "--out", str(ray_masks)) == 0
    names = same_bytes(ray_masks, watch_masks)
    assert names == sorted(str(mask_path(watch_masks, photos / n).relative_to(
        watch_masks.resolve())) for n in ("x.jpg", "x.png"))


def test_batch_masks_are_the_daemons_with_a_network_that_aligns_corners(ray_session,
                                                                        trained_model,
                                                                        tmp_path):
    """The trained DeepLabV3 resizes its logits with align_corners=True (its manifest says
    so): the Ray job's masks are still the daemon's, byte for byte. Before: the Ray job had
    its own copy of the postprocess function, which left align_corners out."""
    from pspnet.core.config import PipelineConfig
    from pspnet.daemon.front import Front, requests_for

    paths = sorted(SAMPLE_DIR.glob("*.jpg"))
    daemon_masks = tmp_path / "daemon-masks"
    cfg = PipelineConfig(model_dir=trained_model, batch_size=4, preprocess_workers=1,
                         postprocess_workers=1, out_dir=daemon_masks)
    with Front(cfg) as pipe:
        assert all(r.status == "ok" for r in pipe.run(requests_for(paths)))
    ray_masks = tmp_path / "ray-masks"
    assert batch("--images", str(SAMPLE_DIR), "--model", str(trained_model),
                 "--out", str(ray_masks)) == 0
    assert len(same_bytes(ray_masks, daemon_masks)) == len(paths)


def test_batch_scores_a_voc_folder_as_pspnet_eval_does(ray_session, tiny_models, tmp_path,
                                                       capsys):
    """A VOC folder with a missing image, a missing and a broken ground truth and a corrupt
    JPEG, labels head: `pspnet batch --voc` and `pspnet eval --voc` write the same mask
    bytes and the same result JSON (mIoU, per class, failures) to the last digit."""
    voc = make_voc_folder(tmp_path / "voc", missing_image=True, missing_truth=True,
                          broken_truth=True)
    corrupt_jpeg(voc.images[voc.ids[2]])
    model = tiny_models["labels"]
    common = ["--voc", str(voc.root), "--model", str(model)]

    eval_masks, eval_json = tmp_path / "eval-masks", tmp_path / "eval.json"
    assert main(["eval", *common, "--batch-size", "4", "--preprocess-workers", "1",
                 "--postprocess-workers", "1", "--out", str(eval_masks),
                 "--json", str(eval_json)]) == 0
    ray_masks, ray_json = tmp_path / "ray-masks", tmp_path / "batch.json"
    assert batch(*common, "--out", str(ray_masks), "--json", str(ray_json)) == 0
    out = capsys.readouterr().out

    assert len(same_bytes(ray_masks, eval_masks)) == len(voc.images) - 1
    ours, theirs = json.loads(ray_json.read_text()), json.loads(eval_json.read_text())
    for key in COMPARED:
        assert ours[key] == theirs[key], key
    print(f"mIoU: batch {ours['mIoU']!r}, eval {theirs['mIoU']!r} "
          f"({ours['images']} images scored)")
    assert ours["images"] == len(voc.scorable) - 1 >= 5       # the corrupt JPEG: not scored
    assert {f["id"] for f in ours["failed"]} == {
        *voc.missing_images, *voc.missing_truths, *voc.broken_truths, voc.ids[2]}
    assert "per class results:" in out and "aAcc:" in out


def test_batch_listing_relative_paths_and_ground_truths(ray_session, tiny_models, tmp_path):
    """`--list`: IMAGE[<TAB>TRUTH] per line, relative to the listing's folder; a missing
    file fails its row with the decoder's reason."""
    voc = make_voc_folder(tmp_path / "voc")
    first, second = voc.ids[:2]
    listing = tmp_path / "voc" / "todo.txt"
    listing.write_text("# two images, one with its ground truth, and one that is not there\n"
                       f"JPEGImages/{first}.jpg\tSegmentationClass/{first}.png\n\n"
                       f"JPEGImages/{second}.jpg\n"
                       "JPEGImages/nowhere.jpg\n")
    report = tmp_path / "list.json"
    assert batch("--list", str(listing), "--model", str(tiny_models["logits"]),
                 "--json", str(report)) == 0
    doc = json.loads(report.read_text())
    assert (doc["listed"], doc["segmented"], doc["images"]) == (3, 2, 1)
    assert doc["failed"] == [{"id": "nowhere", "path": str(tmp_path / "voc/JPEGImages/"
                                                           "nowhere.jpg"),
                              "reason": "preprocess: no such file"}]
    assert doc["masks"] is None


def test_batch_refusals(ray_session, tiny_models, tmp_path, capsys):
    """One line each, before or instead of a traceback: a backend that cannot open in its
    actor, a GPU this machine lacks, inputs that are not there."""
    model = str(tiny_models["logits"])
    assert batch("--images", str(SAMPLE_DIR), "--model", model,
                 "--backend-option", "bogus=1") == 2      # before Ray starts: a usage error
    assert "pspnet batch: error: unknown ort backend option(s) bogus" \
        in capsys.readouterr().err
    assert batch("--images", str(SAMPLE_DIR), "--model", model, "--device", "cuda") == 1
    assert "has no GPU" in capsys.readouterr().err
    assert batch("--images", str(tmp_path), "--model", model) == 2
    assert "no image files" in capsys.readouterr().err
    assert batch("--list", str(tmp_path / "none.txt"), "--model", model) == 2
    assert "cannot read the listing" in capsys.readouterr().err
    assert ray_session.is_initialized()              # a session the caller made is kept


def _broken_step(batch):
    raise ImportError("cannot import name 'mask_path' from 'pspnet.model.labels'")


def test_a_failing_step_is_named_by_its_own_error(ray_session):
    """Ray Data wraps a map task's error in UserCodeException text whose last line is advice
    about retries; the user's own error line is what `pspnet batch` must print."""
    with pytest.raises(Exception) as caught:
        ray_session.data.range(4).map_batches(_broken_step).take_all()
    assert ray_batch.root_cause(caught.value) == (
        "ImportError: cannot import name 'mask_path' from 'pspnet.model.labels'")


def test_batch_without_ray_names_the_extra(tiny_models, tmp_path, capsys, monkeypatch):
    """An install without the `ray` extra: one line naming it, exit 2 (it was a
    ModuleNotFoundError traceback once the job began)."""
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)          # `import ray` fails
    code = main(["batch", "--images", str(tmp_path), "--model", str(tiny_models["labels"])])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("pspnet batch: error: needs Ray Data, the `ray` extra (")
    assert lines[0].endswith("pip install 'pspnet-daemon[ray]'")


def test_joining_a_cluster_uses_token_auth_when_a_token_is_here(tmp_path, monkeypatch):
    """`ray start --head` (Ray 2.5x) turns token authentication on and writes the token to
    ~/.ray/auth_token; a driver joins only with RAY_AUTH_MODE=token. With a token at hand
    `pspnet batch --address` sets it; RAY_AUTH_MODE given wins; no token, nothing set."""
    import os

    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.setenv(name, "")            # so that the test's end restores it
        monkeypatch.delenv(name)
    assert not ray_batch.token_auth_if_token_here() and "RAY_AUTH_MODE" not in os.environ
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("secret")
    assert ray_batch.token_auth_if_token_here() and os.environ["RAY_AUTH_MODE"] == "token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert not ray_batch.token_auth_if_token_here()
    assert os.environ["RAY_AUTH_MODE"] == "disabled"


def test_no_cluster_at_address_mentions_token_auth(tiny_models, capsys, monkeypatch):
    """A join that fails says what to set if the cluster uses token authentication (the
    join's own words were 20 s of InvalidAuthToken warnings, then 'Failed to connect')."""
    def refused(*args, **kwargs):
        raise ConnectionError("Failed to connect to Ray cluster")

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setattr(ray_batch, "run", refused)
    code = main(["batch", "--images", str(SAMPLE_DIR), "--model", str(tiny_models["labels"]),
                 "--address", "127.0.0.1:6379"])
    err = capsys.readouterr().err
    (last,) = [line for line in err.splitlines() if "error" in line]   # and the progress
    assert code == 4, err
    assert last == ("pspnet batch: error: no Ray cluster at 127.0.0.1:6379: Failed to connect "
                    "to Ray cluster (a cluster started with `ray start` (Ray 2.5x) uses token "
                    "authentication: set RAY_AUTH_MODE=token with its token in "
                    "~/.ray/auth_token or RAY_AUTH_TOKEN)")


def test_from_listing_and_folder_need_no_ray(tmp_path):
    assert [i.id for i in from_folder(SAMPLE_DIR).items][:2] == [
        "astronaut_500x375", "chelsea_451x300"]
    listing = tmp_path / "l.txt"
    listing.write_text("/abs/a.jpg\tgt/a.png\nb.jpg\n")
    items = ray_batch.from_listing(listing).items
    assert items[0].image == Path("/abs/a.jpg") and items[0].truth == tmp_path / "gt/a.png"
    assert items[1].image == tmp_path / "b.jpg" and items[1].truth is None


def test_ray_is_imported_by_pspnet_batch_alone():
    """An optional extra: the CLI, the daemon and this module import without it."""
    import subprocess
    import sys

    code = ("import sys, pspnet.cli, pspnet.batch.ray_batch, studies.ray_compare, "
            "pspnet.daemon.server; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == "[]"


def odd_folder(folder: Path) -> dict[str, str]:
    """Two photos, a corrupt JPEG and every kind of entry the issue found left out, each
    with the words its failed row must say."""
    folder.mkdir()
    for name in ("astronaut_500x375.jpg", "chelsea_451x300.jpg"):
        shutil.copyfile(SAMPLE_DIR / name, folder / name)
    corrupt_jpeg(folder / "broken.jpg")
    (folder / "dangling.jpg").symlink_to(folder / "nowhere.jpg")
    (folder / "loop_a.jpg").symlink_to(folder / "loop_b.jpg")
    (folder / "loop_b.jpg").symlink_to(folder / "loop_a.jpg")
    os.mkfifo(folder / "fifo.jpg")
    (folder / "x.jpg").mkdir()
    (folder / "zero.jpg").touch()
    (folder / "notes.txt").write_text("not a photo")
    shutil.copyfile(SAMPLE_DIR / "chelsea_451x300.jpg", folder / "chelsea_451x300.png")
    return {"dangling.jpg": "broken symbolic link", "loop_a.jpg": "symbolic link loop",
            "loop_b.jpg": "symbolic link loop", "fifo.jpg": "not a regular file",
            "x.jpg": "a directory", "zero.jpg": "0 bytes", "notes.txt": "not an image file"}


def test_every_entry_of_an_odd_folder_is_listed_or_failed(tmp_path):
    """No Ray: each odd entry is a failed row with its reason, the rest are items, and
    listed counts every entry."""
    expected = odd_folder(tmp_path / "odd")
    split = from_folder(tmp_path / "odd")
    assert split.listed == 11 == len(split.items) + len(split.missing)
    assert sorted((i.id, i.image.name) for i in split.items) == [
        ("astronaut_500x375", "astronaut_500x375.jpg"), ("broken", "broken.jpg"),
        ("chelsea_451x300", "chelsea_451x300.jpg"),
        ("chelsea_451x300.png", "chelsea_451x300.png")]     # issue 24: both masked
    reasons = {f["id"]: f["reason"] for f in split.missing}
    assert set(reasons) == set(expected)
    for name, words in expected.items():
        assert words in reasons[name], (name, reasons[name])


def test_batch_on_an_odd_folder_counts_add_up(ray_session, tiny_models, tmp_path):
    """Issue 23: 5 of 21 entries (a dangling link, two symlink loops, a FIFO, a folder named
    x.jpg) were neither masked nor failed. Now: listed = segmented + failed, exit 0."""
    expected = odd_folder(tmp_path / "odd")
    masks, report = tmp_path / "masks", tmp_path / "batch.json"
    code = batch("--images", str(tmp_path / "odd"), "--model", str(tiny_models["logits"]),
                 "--out", str(masks), "--json", str(report))
    assert code == 0
    doc = json.loads(report.read_text())
    assert doc["listed"] == 11 == doc["segmented"] + len(doc["failed"])
    assert doc["segmented"] == 3 == len(list(masks.rglob("*.png")))
    assert {f["id"] for f in doc["failed"]} == {*expected, "broken"}
