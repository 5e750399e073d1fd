"""Mask names: images named alike each get a mask of their own, the same image processed
again replaces its own, and a name held by another image is never overwritten."""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pspnet.model import masks as masks_mod
from pspnet.model.labels import read_ground_truth
from pspnet.model.manifest import voc_palette
from pspnet.model.masks import (
    SOURCE_KEY,
    MaskNameTaken,
    mask_path,
    mask_source,
    recorded_source,
    write_mask,
)
from tests.kit import watch_record

PALETTE = voc_palette(21)


def labels(value: int, shape: tuple[int, int] = (5, 7)) -> np.ndarray:
    return np.full(shape, value, np.uint8)


def images(tmp_path: Path, *names: str) -> list[Path]:
    """Empty files standing for images (the mask's source is their real path)."""
    out = []
    for name in names:
        path = tmp_path / "in" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        out.append(path)
    return out


@pytest.mark.parametrize("names", [("a/x.jpg", "b/x.jpg"), ("x.jpg", "x.png"),
                                   ("with space.jpg", "with_space.jpg")])
def test_images_with_the_same_name_get_masks_of_their_own(tmp_path: Path, names) -> None:
    """Issue 24: two photos named alike in different folders (or x.jpg beside x.png) both get
    a mask, each below --out where the image sits below /."""
    first, second = images(tmp_path, *names)
    out = tmp_path / "out"
    targets = [mask_path(out, str(image)) for image in (first, second)]
    assert targets[0] != targets[1]
    for value, (image, target) in enumerate(zip((first, second), targets, strict=True), 1):
        assert target == out.resolve() / f"{str(image.resolve())[1:]}.png"
        write_mask(labels(value), target, PALETTE, source=image)
    for value, (image, target) in enumerate(zip((first, second), targets, strict=True), 1):
        assert (read_ground_truth(target) == value).all()
        assert recorded_source(target) == str(image.resolve())


def test_a_name_taken_by_another_image_is_refused(tmp_path: Path) -> None:
    """The claim stays as a guard: a mask that records another image is never replaced."""
    first, second = images(tmp_path, "a/x.jpg", "b/x.jpg")
    target = tmp_path / "out" / "x.png"
    write_mask(labels(1), target, PALETTE, source=first)
    with pytest.raises(MaskNameTaken) as caught:
        write_mask(labels(2), target, PALETTE, source=second)
    assert str(caught.value) == (f"mask name {target.name} already holds the mask of "
                                 f"{first.resolve()}; rename one of them")
    assert (read_ground_truth(target) == 1).all()          # the first mask is untouched
    assert recorded_source(target) == str(first.resolve())
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]   # no temp left


def test_the_same_image_again_replaces_its_own_mask(tmp_path: Path) -> None:
    (image,) = images(tmp_path, "x.jpg")
    target = mask_path(tmp_path / "out", str(image))
    write_mask(labels(1), target, PALETTE, source=image)
    write_mask(labels(2), mask_path(tmp_path / "out", image), PALETTE, source=str(image))
    assert (read_ground_truth(target) == 2).all()
    link = tmp_path / "in" / "alias.jpg"                    # another name of the same file
    link.symlink_to(image)
    assert mask_path(tmp_path / "out", link) == target
    write_mask(labels(3), target, PALETTE, source=link)
    assert (read_ground_truth(target) == 3).all()
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_the_source_is_a_text_chunk_and_pixels_and_palette_are_unchanged(tmp_path: Path,
                                                                         ) -> None:
    (image,) = images(tmp_path, "x.jpg")
    values = np.random.default_rng(5).integers(0, 21, (37, 53), np.uint8)
    write_mask(values, tmp_path / "plain.png", PALETTE)
    write_mask(values, tmp_path / "x.png", PALETTE, source=image)
    with Image.open(tmp_path / "plain.png") as plain, Image.open(tmp_path / "x.png") as im:
        assert im.mode == plain.mode == "P"
        assert im.getpalette() == plain.getpalette()
        assert np.array_equal(np.asarray(im), np.asarray(plain))
        assert np.array_equal(np.asarray(im), values)
        assert im.info[SOURCE_KEY] == str(image.resolve())  # Pillow reads what we wrote
        assert SOURCE_KEY not in plain.info
    assert recorded_source(tmp_path / "plain.png") is None


def test_a_large_mask_is_run_length_compressed_and_exact(tmp_path: Path) -> None:
    """Issue 21: masks are long runs of one class; zlib's run-length strategy keeps a 3 Mpx
    two-object mask under 12 KB (level 1's default strategy: 24.6 KB; level 6: 14.7 KB)
    and the pixels exact."""
    yy, xx = np.mgrid[:1500, :2000]
    values = np.zeros((1500, 2000), np.uint8)
    values[(yy - 700) ** 2 + (xx - 900) ** 2 < 500 ** 2] = 15
    values[(yy - 300) ** 2 / 4 + (xx - 1600) ** 2 < 200 ** 2] = 7
    write_mask(values, tmp_path / "big.png", PALETTE, source=tmp_path / "big.jpg")
    assert (tmp_path / "big.png").stat().st_size < 12_000
    assert np.array_equal(read_ground_truth(tmp_path / "big.png"), values)


def test_a_mask_without_a_source_is_replaced_and_claimed(tmp_path: Path) -> None:
    """A file that records no source (an older mask, another program's) is overwritten as
    before; from then on the name belongs to the image written over it."""
    first, second = images(tmp_path, "a/x.jpg", "b/x.jpg")
    target = tmp_path / "out" / "x.png"
    write_mask(labels(1), target, PALETTE)                 # no source recorded
    write_mask(labels(2), target, PALETTE, source=first)
    assert (read_ground_truth(target) == 2).all()
    with pytest.raises(MaskNameTaken):
        write_mask(labels(3), target, PALETTE, source=second)
    target.write_bytes(b"not a png")
    write_mask(labels(4), target, PALETTE, source=second)
    assert recorded_source(target) == str(second.resolve())


def test_workers_racing_for_a_free_name_one_wins(tmp_path: Path) -> None:
    """No shared state: link(2) lets exactly one of them create the name."""
    sources = images(tmp_path, *[f"d{i}/x.jpg" for i in range(8)])
    target = tmp_path / "out" / "x.png"
    target.parent.mkdir()
    start = threading.Barrier(len(sources))
    won: list[Path] = []
    refused: list[Path] = []

    def write(i: int, source: Path) -> None:
        start.wait()
        try:
            write_mask(labels(i), target, PALETTE, source=source)
            won.append(source)
        except MaskNameTaken:
            refused.append(source)

    threads = [threading.Thread(target=write, args=(i, s)) for i, s in enumerate(sources)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == len(sources) - 1
    assert recorded_source(target) == str(won[0].resolve())
    assert (read_ground_truth(target) == sources.index(won[0])).all()
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.png"]


def test_without_hard_links_the_check_still_refuses(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(_src: object, _dst: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(masks_mod.os, "link", no_links)
    first, second = images(tmp_path, "a/x.jpg", "b/x.jpg")
    target = tmp_path / "out" / "x.png"
    write_mask(labels(1), target, PALETTE, source=first)
    write_mask(labels(2), target, PALETTE, source=first)
    with pytest.raises(MaskNameTaken):
        write_mask(labels(3), target, PALETTE, source=second)
    assert (read_ground_truth(target) == 2).all()
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.png"]


def test_a_link_planted_after_the_check_is_replaced_not_followed(tmp_path: Path) -> None:
    (image,) = images(tmp_path, "x.jpg")
    secret = tmp_path / "secret.png"
    write_mask(labels(9), secret, PALETTE, source=tmp_path / "other.jpg")
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.png").symlink_to(secret)
    write_mask(labels(1), out / "x.png", PALETTE, source=image)
    assert not (out / "x.png").is_symlink() and (read_ground_truth(out / "x.png") == 1).all()
    assert (read_ground_truth(secret) == 9).all()


def test_undecodable_file_names_are_recorded_and_compared(tmp_path: Path) -> None:
    raw = os.fsencode(tmp_path) + b"/in/caf\xe9.jpg"         # Latin-1, not UTF-8
    os.makedirs(os.path.dirname(raw), exist_ok=True)
    open(raw, "wb").close()
    image = os.fsdecode(raw)
    target = tmp_path / "out" / "x.png"
    write_mask(labels(1), target, PALETTE, source=image)
    write_mask(labels(2), target, PALETTE, source=image)
    assert recorded_source(target) == mask_source(image)
    assert recorded_source(target).endswith("caf\\xe9.jpg")


def test_watch_mode_masks_x_jpg_and_x_png_apart_and_does_not_redo_them(
        tiny_models, photo_files, tmp_path, daemons):
    """x.jpg and x.png in a watched folder: two masks, both in the record, where
    mask_path puts them; a restart submits neither again."""
    inbox, out = tmp_path / "inbox", tmp_path / "masks"
    inbox.mkdir()
    shutil.copy(photo_files[0], inbox / "x.jpg")
    Image.open(photo_files[1]).save(inbox / "x.png")
    args = ("--watch", str(inbox), "--batch-size", "4", "--preprocess-workers", "1")
    daemon = daemons(tiny_models["logits"], out, tmp_path, *args)
    try:
        daemon.wait_ready()
        deadline = time.monotonic() + 60
        while len(watch_record(out)) < 2:
            assert time.monotonic() < deadline, daemon.logs()
            time.sleep(0.1)
    finally:
        assert daemon.stop() == 0, daemon.logs()
    entries = {e["name"]: e for e in watch_record(out)}
    assert sorted(entries) == ["x.jpg", "x.png"]
    for name, entry in entries.items():
        assert entry["status"] == "ok", entry
        assert entry["mask"] == str(mask_path(out, inbox / name))
        assert recorded_source(Path(entry["mask"])) == str((inbox / name).resolve())
        with Image.open(inbox / name) as im:
            assert entry["size"] == [im.height, im.width]       # what was found, recorded
        assert sum(pixels for _, _, pixels in entry["found"]) == im.height * im.width
    daemon = daemons(tiny_models["logits"], out, tmp_path, *args)
    try:
        daemon.wait_ready()
        time.sleep(2.0)                    # past the settle time: both files looked at
        submitted = daemon.status()["front"]["submitted"]
    finally:
        assert daemon.stop() == 0, daemon.logs()
    (watching,) = [e for e in daemon.events() if e.get("event") == "watching"]
    assert watching["final"] == 2 and submitted == 0
    assert len(watch_record(out)) == 2


def _pillow_source(path: Path) -> str | None:
    """What recorded_source said before its fast path: Pillow's reading of the chunks."""
    from PIL import PngImagePlugin
    try:
        with open(path, "rb") as f, PngImagePlugin.PngImageFile(f) as im:
            text = im.info.get(SOURCE_KEY)
    except (SyntaxError, OSError, ValueError):
        return None
    return str(text) if isinstance(text, str) else None


def test_the_recorded_source_read_without_pillow_agrees_with_pillow(tmp_path: Path) -> None:
    """recorded_source reads our own masks' chunks itself (masks_mod._own_source) and
    leaves every other file to Pillow: on masks, damaged masks (each byte of the chunks
    before the pixels changed in turn), a source that is not UTF-8 and other PNGs, it
    says what Pillow says, and it is sure only of files shaped as png_bytes writes them."""
    (image,) = images(tmp_path, "caf\u00e9 x.jpg")
    values = np.random.default_rng(7).integers(0, 21, (9, 11), np.uint8)
    files, intact = [], []
    for source in (str(image), None):
        data = masks_mod.png_bytes(values, PALETTE, None if source is None
                                   else mask_source(source))
        assert masks_mod._own_source(data)[0]
        head = data.index(b"IDAT") - 4
        for k in range(head):                        # every byte before the pixels
            broken = bytearray(data)
            broken[k] ^= 0x41
            files.append(bytes(broken))
        intact.append(len(files))
        files.append(data)
    assert masks_mod._own_source(files[-1]) == (True, None)
    bad_utf8 = masks_mod.png_bytes(values, PALETTE, "x").replace(
        b"\0\0\0\0\0x", b"\0\0\0\0\0\xff")
    files.append(bad_utf8)
    for mode in ("L", "P", "RGB"):
        other = tmp_path / f"other-{mode}.png"
        Image.new(mode, (4, 3)).save(other, pnginfo=None)
        files.append(other.read_bytes())
    sure = 0
    for n, data in enumerate(files):
        path = tmp_path / f"f{n}.png"
        path.write_bytes(data)
        assert recorded_source(path) == _pillow_source(path), n
        sure += masks_mod._own_source(data)[0]
    assert recorded_source(tmp_path / f"f{intact[0]}.png") == mask_source(image)
    assert recorded_source(tmp_path / f"f{intact[1]}.png") is None
    assert 2 <= sure < len(files) // 2


def test_a_photo_and_a_folder_that_want_one_mask_name_get_a_line_that_says_so(tmp_path):
    """`a.jpg` and `a.jpg.png/b.jpg` both want `a.jpg.png` under --out: one as its mask,
    one as the folder of its masks. Whichever comes second was an errno ("[Errno 21] Is a
    directory", "[Errno 17] File exists"); now a line that names the path and the fix.
    The first one's mask stays, and no temporary file is left."""
    out = tmp_path / "out"
    photo, inner = images(tmp_path / "in", "a.jpg", "a.jpg.png/b.jpg")
    write_mask(labels(1), mask_path(out, photo), PALETTE, source=photo)
    with pytest.raises(MaskNameTaken, match=r"mask path .*a\.jpg\.png is the mask of a "
                                            r"photo, .* rename one of the two$"):
        write_mask(labels(2), mask_path(out, inner), PALETTE, source=inner)
    assert np.asarray(Image.open(mask_path(out, photo))).max() == 1

    out2 = tmp_path / "out2"
    write_mask(labels(2), mask_path(out2, inner), PALETTE, source=inner)
    with pytest.raises(MaskNameTaken, match=r"mask path .*a\.jpg\.png is a folder .* "
                                            r"rename one of the two$"):
        write_mask(labels(1), mask_path(out2, photo), PALETTE, source=photo)
    assert not [p for p in out2.rglob("*") if p.name.endswith(".tmp")]
