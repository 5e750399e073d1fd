"""Mask files: their names, their atomic writes, and the source each records.

No torch or cv2 here: the front reads masks' recorded sources too (watch mode recognises a
mask already written for an image whose answer a kill -9 kept out of the record).
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import stat
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import PngImagePlugin
from zlib_ng import zlib_ng

from pspnet.core.files import shown_path

# Deflate level 1 with run-length matching only (Z_RLE): label maps are long runs of one
# value. Measured on the trained model's masks (studies/postprocess_cost.py png): 4000 x
# 3000, 32 ms and 22 KB against 41 ms and 75 KB at level 1 and 91 ms and 30 KB at the
# default level 6; sample photos, 1.1 ms and 1.1 KB against 2.2 ms and 1.3 KB at level 6.
# Pillow's save around the stream added 0.09 ms at 500 x 375, which `png_bytes` (the
# chunks written here) does not.
# The stream is zlib-ng's (python-zlib-ng), not CPython's zlib: the same format and the
# same settings, its RLE matcher and its block writer 3-4 x faster. The trained model's
# masks, best of 5 (of 200 small), stop 34: 8000 x 6000 58.3 -> 14.7 ms, 500 x 375 192 ->
# 56 us, the same sizes (70,382 and 1,717 bytes), the same pixels. memLevel 7: CPython's
# zlib clears a hash table that Z_RLE never uses for every stream, sized by memLevel (at
# 9, Pillow's, it cost 0.34 against 0.25 ms per bench mask, post31); zlib-ng's time does
# not move with it (14.7 / 14.7 / 15.2 ms at 7 / 8 / 9).
PNG_LEVEL = 1
PNG_STRATEGY = zlib_ng.Z_RLE
PNG_MEM_LEVEL = 7
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_BAND_BYTES = 1 << 18         # rows copied (filter byte added) and compressed at a time
MAX_NAME_BYTES = 200             # mask file name, leaves room for temp names (255 at most)
SOURCE_KEY = "pspnet-source"     # iTXt keyword: the image a mask was made from
# link(2) errors that mean "no hard links on this file system" (vfat, some FUSE)
NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP})
# write errors of the storage, not of the request (disk full, quota, read-only, failing
# disk): the daemon outlives them and retries the write once the storage works again
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})


def is_storage_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS


class MaskNameTaken(ValueError):
    """The mask name holds the mask of another image; one-line message for the user."""


def mask_path(out_dir: Path, image: str | os.PathLike[str]) -> Path:
    """The mask file for an image: its real path mirrored below `out_dir`, the file name
    kept whole with `.png` added (/data/a/x.jpg -> OUT/data/a/x.jpg.png).

    Why this scheme: distinct images never share a mask (a real path names one file, and
    keeping the whole name keeps x.jpg and x.png apart); the same image, under any of its
    names (links are resolved, as `mask_source` records it), always gets the same one, so
    resubmitting replaces its own mask. It needs no setting and no state, so the daemon,
    watch mode and `pspnet batch` agree, across restarts and whatever `--allow-root` says.
    A name longer than MAX_NAME_BYTES is cut and given a hash of the whole name. Refuses a
    link at the target and a link on the way that leads out of `out_dir`, so a planted link
    cannot redirect the write. The one clash left, a folder named like a mask (`x.jpg.png/`
    beside `x.jpg`), fails the write instead of replacing anything.
    """
    return mask_target(out_dir, image)[0]


def mask_target(out_dir: Path, image: str | os.PathLike[str]) -> tuple[Path, str]:
    """(`mask_path(out_dir, image)`, `mask_source(image)`) from one realpath of the image:
    the postprocess worker needs both for every mask, and each realpath is an lstat per
    folder on the way. Plain strings, not pathlib's objects, and the mirrored folders below
    the resolved `out_dir` looked at alone (it is real already): the worker pays this for
    every mask."""
    image = os.fspath(image)
    if "\x00" in image:
        raise ValueError("image path contains a NUL byte")
    real = os.path.realpath(image)
    *folders, name = [part for part in real.split("/") if part] or [""]
    if not image or not name:
        raise ValueError(f"no usable file name in {image!r}")
    root = os.path.realpath(out_dir)
    if not _within(_real_below(root, folders), root):
        raise ValueError(f"mask path for {image!r} leaves the output directory through a link")
    target = os.path.join(root, *folders, _mask_name(name))
    try:
        link = stat.S_ISLNK(os.lstat(target).st_mode)
    except OSError as exc:                 # as pathlib's is_symlink: these mean "no link"
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP):
            raise
        link = False
    if link:
        raise ValueError(f"{target} is a symbolic link; refusing to write through it")
    return Path(target), shown_path(real)


def _real_below(root: str, folders: Sequence[str]) -> str:
    """`os.path.realpath(root/folders...)` where `root` is real already and the folders are
    plain names (from a realpath): only the folders are looked at; at a link among them
    realpath resolves the rest, and a missing one ends the walk (realpath keeps the rest
    as written)."""
    path = root
    for k, folder in enumerate(folders):
        path = os.path.join(path, folder)
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            return os.path.join(path, *folders[k + 1:])
        if stat.S_ISLNK(mode):
            return os.path.realpath(os.path.join(path, *folders[k + 1:]))
    return path


def _within(path: str, root: str) -> bool:
    """Whether `path` is `root` or lies below it (both real and absolute)."""
    return path == root or path.startswith(root if root.endswith("/") else root + "/")


def _mask_name(name: str) -> str:
    """The name itself with .png added; a long one cut at a character's start (a cut
    inside "é" left half a character, which no answer could carry: the worker died on
    every image of the batch) and given a hash of the whole name."""
    raw = os.fsencode(name)
    if len(raw) <= MAX_NAME_BYTES:
        return f"{name}.png"
    digest = hashlib.sha256(raw).hexdigest()[:16]
    cut = raw[:MAX_NAME_BYTES - 17]
    try:
        cut.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.reason == "unexpected end of data":  # the cut character's first bytes
            cut = cut[:exc.start]
    return f"{os.fsdecode(cut)}~{digest}.png"


def write_mask(labels: np.ndarray, path: Path, palette: Sequence[Sequence[int]],
               source: str | os.PathLike[str] | None = None) -> None:
    """Write a palette PNG (pixel = class id) atomically: readers see the old file or the
    whole new one, never a partial one.

    The PNG is written to a uniquely named temp file in the same directory (created with
    O_EXCL, so it cannot follow a planted link) and renamed over `path`. No fsync: a crash
    may lose the newest masks but never leaves a torn one under the final name.

    With `source` (the image's path) the mask records it (`mask_source`, a PNG text chunk;
    pixels and palette unchanged) and the name is claimed for it: `mask_path` gives distinct
    images distinct names, but a file written by hand or a cut name's hash could still
    clash, and the claim makes such a clash an error instead of a lost mask. A mask there
    that records another source is left alone and MaskNameTaken raised; one recording the
    same source (the image processed again), none (another program's file, an older mask)
    or no file is replaced.
    A free name is taken with link(2), which fails when the name exists, so of several
    workers racing for it one wins and the others see its source: no shared state.
    """
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise ValueError(f"labels must be uint8 H x W, got {labels.dtype} {labels.shape}")
    if source is not None:
        source = mask_source(source)
    store_mask(png_bytes(labels, palette, source), path, source)


def mask_png(labels: np.ndarray, palette: Sequence[Sequence[int]],
             source: str | os.PathLike[str] | None = None) -> bytes:
    """The palette PNG `write_mask` writes, as bytes: what an upload's answer carries back
    (`store_mask` writes them on the client's side), so both are the same file."""
    return png_bytes(labels, palette, None if source is None else mask_source(source))


def store_mask(png: bytes | memoryview, path: Path, source: str | None = None) -> None:
    """`png` at `path`, atomically (see `write_mask`); `source` (as `mask_source` gives
    it): the name is claimed for that image."""
    path = os.fspath(path)                     # strings: pathlib's objects cost more here
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(tmp, flags, 0o644)
    except (FileNotFoundError, NotADirectoryError):
        # a new folder (or a file in the way, which mkdir reports): made only when needed,
        # not tried (mkdir, EEXIST, stat) for every mask
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise MaskNameTaken(_in_the_way(folder, "is the mask of a photo, not a folder "
                                                    "for the masks of the photos in "
                                                    "its namesake folder")) from None
        fd = os.open(tmp, flags, 0o644)
    try:
        try:
            _write_all(fd, png)                  # no file object: 2 syscalls fewer
        finally:
            os.close(fd)
        if source is None:
            os.replace(tmp, path)
        else:
            _claim(tmp, path, source)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, IsADirectoryError):
            raise MaskNameTaken(_in_the_way(path, "is a folder (the masks of the photos in "
                                                  "a folder of that name)")) from None
        raise


def _in_the_way(path: str, what: str) -> str:
    """One line for a mask name that a photo's mask and a folder of masks both want:
    `photos/a.jpg` and `photos/a.jpg.png/b.jpg` give `a.jpg.png` twice."""
    while path and not os.path.lexists(path):
        path = os.path.dirname(path)                # the part that is in the way
    return f"mask path {path} {what}; rename one of the two"


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def png_bytes(labels: np.ndarray, palette: Sequence[Sequence[int]],
              source: str | None = None) -> bytes:
    """A palette PNG (8-bit indices = the labels, PLTE = `palette`, `source` in an iTXt
    chunk under SOURCE_KEY), the chunks Pillow writes for it (IHDR, iTXt, PLTE, IDAT,
    IEND; filter 0 on every row, as Pillow uses for palette images), written here
    because Pillow's save around the deflate stream cost a third as much as the stream."""
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise ValueError(f"labels must be uint8 H x W, got {labels.dtype} {labels.shape}")
    flat = [int(v) for colour in palette for v in colour]
    if len(flat) % 3 or not 0 < len(flat) <= 768 or not all(0 <= v <= 255 for v in flat):
        raise ValueError("palette must be 1..256 [r, g, b] entries of 0..255")
    h, w = labels.shape
    deflate = zlib_ng.compressobj(PNG_LEVEL, zlib_ng.DEFLATED, zlib_ng.MAX_WBITS,
                                  PNG_MEM_LEVEL, PNG_STRATEGY)
    band = max(1, min(h, PNG_BAND_BYTES // (w + 1)))
    rows = np.empty((band, w + 1), np.uint8)    # each row: filter byte 0, then the indices
    rows[:, 0] = 0
    stream = []
    for top in range(0, h, band):               # a band at a time: the copy stays in cache
        n = min(band, h - top)
        rows[:n, 1:] = labels[top:top + n]
        stream.append(deflate.compress(rows[:n]))
    stream.append(deflate.flush())
    chunks = [PNG_SIGNATURE,
              _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0))]
    if source is not None:                      # keyword, no compression, no language
        chunks.append(_chunk(b"iTXt", SOURCE_KEY.encode("latin-1") + b"\0\0\0\0\0"
                             + source.encode("utf-8")))
    chunks += [_chunk(b"PLTE", bytes(flat)),
               _chunk(b"IDAT", b"".join(stream)),
               _chunk(b"IEND", b"")]
    return b"".join(chunks)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib_ng.crc32(body, zlib_ng.crc32(kind))))


def mask_source(image: str | os.PathLike[str]) -> str:
    """The source a mask records for an image: its real path (links resolved, so two names
    of one file are one source), as valid UTF-8 (undecodable bytes escaped)."""
    return shown_path(os.path.realpath(image))




def recorded_source(path: Path) -> str | None:
    """The source recorded in the mask at `path`; None when there is no file, a link or
    another non-regular file, or a file that records none (not a PNG, another program's,
    an older mask). Reads the chunks before the pixels only, and needs no pixel limit."""
    flags = (os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
             | getattr(os, "O_CLOEXEC", 0))      # NONBLOCK: a planted FIFO cannot hang us
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:             # a link planted after mask_path's check
            return None
        raise
    try:                                         # ours: read with no file object
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        sure, text = _own_source(os.read(fd, SOURCE_HEAD_BYTES))
        if sure:
            return text
        os.lseek(fd, 0, os.SEEK_SET)
        f = os.fdopen(fd, "rb", buffering=0)     # closes fd from here on
        fd = -1
        with f:
            try:
                # the plugin class reads the chunks before the first IDAT, no pixels, and
                # (unlike Image.open) applies no decompression-bomb limit to the header
                with PngImagePlugin.PngImageFile(f) as im:
                    text = im.info.get(SOURCE_KEY)
            except (SyntaxError, OSError, ValueError, struct.error):
                return None                      # not a PNG, or a torn one: records none
    finally:
        if fd >= 0:
            os.close(fd)
    return str(text) if isinstance(text, str) else None


SOURCE_HEAD_BYTES = 1 << 16      # a mask's chunks before its pixels fit easily


def _own_source(head: bytes) -> tuple[bool, str | None]:
    """(True, source) for a file that starts as `png_bytes` writes it: IHDR (8-bit
    palette, not interlaced), optionally our iTXt, PLTE, then IDAT, every CRC right; the
    source is what Pillow's reader gives for it. (False, None) for anything else, which
    Pillow then reads as before. Why: Pillow's PngImageFile cost 0.08 ms a mask, paid on
    every mask written again (the claim reads the one in place), for a few chunks."""
    pos, kinds, text = len(PNG_SIGNATURE), [], None
    if not head.startswith(PNG_SIGNATURE):
        return False, None
    prefix = SOURCE_KEY.encode("latin-1") + b"\0\0\0\0\0"    # no compression, no language
    while pos + 8 <= len(head) and len(kinds) < 3:
        size, kind = int.from_bytes(head[pos:pos + 4], "big"), head[pos + 4:pos + 8]
        if kind == b"IDAT":
            break
        end = pos + 12 + size
        if end > len(head):
            return False, None
        body = head[pos + 8:end - 4]
        if zlib_ng.crc32(body, zlib_ng.crc32(kind)) != int.from_bytes(head[end - 4:end], "big"):
            return False, None
        if kind == b"iTXt":
            if not body.startswith(prefix):
                return False, None
            try:
                text = body[len(prefix):].decode("utf-8")
            except UnicodeDecodeError:
                return False, None
        elif kind == b"IHDR" and (len(body) != 13 or body[8:] != b"\x08\x03\0\0\0"
                                  or not int.from_bytes(body[0:4], "big")
                                  or not int.from_bytes(body[4:8], "big")):
            return False, None
        kinds.append(kind)
        pos = end
    if head[pos + 4:pos + 8] != b"IDAT" or kinds not in (
            [b"IHDR", b"iTXt", b"PLTE"], [b"IHDR", b"PLTE"]):
        return False, None
    return True, text


def _claim(tmp: str, path: str, source: str) -> None:
    """Move the finished temp file to `path` unless that holds another source's mask."""
    try:
        os.link(tmp, path)                       # atomic: fails when the name exists
    except FileExistsError:
        pass
    except OSError as exc:
        if exc.errno not in NO_HARD_LINKS:
            raise
        # No hard links here: check, then replace. Two workers racing for a free name
        # can then both pass the check, and the later one wins.
    else:
        os.unlink(tmp)
        return
    holder = recorded_source(path)
    if holder is not None and holder != source:
        raise MaskNameTaken(f"mask name {os.path.basename(path)} already holds the mask of "
                            f"{holder}; rename one of them")
    os.replace(tmp, path)
