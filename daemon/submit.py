"""`pspnet submit`: the images a user has (files, folders, a list, stdin) in; per image a
readable line on a terminal or a JSON line otherwise out; Ctrl-C cancels what has not
started and says what became of the rest."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from pspnet.core.config import IMAGE_SUFFIXES, UNREAD_PHOTO_SUFFIXES
from pspnet.core.exits import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_UNAVAILABLE, EXIT_USAGE
from pspnet.core.files import shown_path
from pspnet.core.logs import json_safe
from pspnet.daemon.client import (
    CANCELLED,
    Answer,
    Client,
    DaemonUnavailable,
    unavailable_text,
)
from pspnet.daemon.endpoint import default_endpoint, is_local
from pspnet.daemon.uploads_client import Upload

PROGRESS_FROM = 10           # a progress bar (stderr, a terminal) from this many images on
TOP_CLASSES = 3              # classes named on a readable line


class NoImages(ValueError):
    """What was given holds no image to send; one line for the user."""


def gather(paths: Iterable[str], recursive: bool = False, listing: str | None = None,
           stdin: TextIO | None = None, skipped: list[str] | None = None) -> list[str]:
    """Every image path the user gave, in order: files as they are (the daemon says what
    is wrong with one), folders' images (IMAGE_SUFFIXES, no hidden files; with
    `recursive` their subfolders' too), the lines of `listing`, and, for `-`, the lines
    on stdin. A folder without `recursive` that holds only folders says so. `skipped`
    collects the folders' photos the daemon cannot read (HEIC...), for a note."""
    out: list[str] = []
    given = list(paths)
    if listing is not None:
        try:
            given += _lines(Path(listing).read_text(encoding="utf-8-sig",   # Notepad's BOM
                                                    errors="surrogateescape"))
        except OSError as exc:
            raise NoImages(f"--list {listing}: {exc.strerror or exc}") from None
    for path in given:
        if path == "-":
            out += _lines((stdin or sys.stdin).read())
        elif os.path.isdir(path):
            skipped_here: list[str] = []
            found = list(_images_in(Path(path), recursive, skipped=skipped_here))
            if skipped is not None:
                skipped += skipped_here
            if not found:
                more = "" if recursive else " (add -r for its subfolders)"
                if skipped_here:
                    more += (f"; its {len(skipped_here)} HEIC/HEIF/AVIF photos are not "
                             "read: convert them to JPEG first")
                raise NoImages(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}){more}")
            out += found
        else:
            out.append(path)
    return out


def _lines(text: str) -> list[str]:
    text = text.removeprefix("\ufeff")          # a list saved with a BOM, piped to -
    return [line.strip() for line in text.splitlines() if line.strip()]


def _images_in(folder: Path, recursive: bool, seen: set[tuple[int, int]] | None = None,
               skipped: list[str] | None = None) -> Iterator[str]:
    """The images in `folder` (and its subfolders), each folder once: a link back up the
    tree (`up -> ..`) would otherwise send the same photos until the kernel's link limit,
    and a link to / the whole disk."""
    seen = set() if seen is None else seen
    here = folder.stat()
    if (here.st_dev, here.st_ino) in seen:
        return
    seen.add((here.st_dev, here.st_ino))
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and recursive:
            yield from _images_in(entry, recursive, seen, skipped)
        elif entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES:
            yield str(entry)
        elif skipped is not None and entry.suffix.lower() in UNREAD_PHOTO_SUFFIXES:
            skipped.append(str(entry))


def readable(answer: Answer, shown: str) -> str:
    """One line for a person: path, size, the largest classes with their share, where the
    mask went, how long it took."""
    ms = f"{answer.latency_ms:.0f} ms"
    if answer.status != "ok":
        return f"{shown}  error: {answer.error}  ({ms})"
    parts = [shown]
    if answer.size is not None:
        parts.append(f"{answer.size[1]}x{answer.size[0]}")
        shares = answer.shares()
        top = ", ".join(f"{name} {_percent(share)}" for _, name, share in shares[:TOP_CLASSES])
        more = len(shares) - TOP_CLASSES
        parts.append(top + (f" (+{more} more)" if more > 0 else ""))
    parts.append(f"-> {answer.mask}" if answer.mask else "(no mask written)")
    model = f", model {answer.model}" if answer.model else ""
    return "  ".join(parts) + f"  ({ms}{model})"


def _percent(share: float) -> str:
    """A share as a person reads it: a class that is there never shows as 0.0 %."""
    return f"{share * 100:.1f} %" if share >= 0.0005 else "< 0.1 %"


class Interrupts:
    """Counts SIGINT instead of raising KeyboardInterrupt, while a submission runs: the
    client cancels at the first and stops waiting at the second."""

    def __init__(self) -> None:
        self.count = 0
        self._before: Any = None

    def __call__(self) -> int:
        return self.count

    def __enter__(self) -> Interrupts:
        self._before = signal.signal(signal.SIGINT, self._caught)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._before)

    def _caught(self, _signum: int, _frame: object) -> None:
        self.count += 1


def run_submit(args: argparse.Namespace) -> int:
    try:
        return _submit(args)
    except KeyboardInterrupt:                # before or after the submission's own handler
        sys.stderr.write("pspnet submit: interrupted before anything was sent\n")
        return EXIT_INTERRUPTED


def _submit(args: argparse.Namespace) -> int:
    skipped: list[str] = []
    try:
        paths = gather(args.paths, args.recursive, args.list, skipped=skipped)
    except (NoImages, OSError) as exc:       # OSError: a folder that cannot be listed
        return _usage(str(exc))
    if skipped:
        sys.stderr.write(f"pspnet submit: skipped {len(skipped)} HEIC/HEIF/AVIF file"
                         f"{'s' * (len(skipped) > 1)} in the folders (e.g. "
                         f"{shown_path(skipped[0])}): the daemon does not read them; "
                         "convert them to JPEG first (e.g. heif-convert IMG.HEIC IMG.jpg)\n")
    if not paths:
        return _usage("no images given (paths, a folder, --list FILE or - for stdin)")
    if args.ann is not None and len(args.ann) != len(paths):
        return _usage(f"{len(paths)} images but {len(args.ann)} --ann files")
    endpoint = args.endpoint or default_endpoint()
    try:
        upload = upload_options(args, endpoint)
    except ValueError as exc:
        return _usage(str(exc))
    as_json = args.json or not sys.stdout.isatty()
    counts: Counter[str] = Counter()
    try:
        try:
            client = Client(endpoint, args.keys)
        except ValueError as exc:          # a malformed --endpoint, before any socket
            return _usage(str(exc))
        with client, Interrupts() as interrupts, tqdm(
                total=len(paths), unit="img", file=sys.stderr, leave=False,
                disable=len(paths) < PROGRESS_FROM or not sys.stderr.isatty()) as bar:
            for answer in client.submit(paths, args.ann, timeout_s=args.timeout,
                                        interrupts=interrupts, upload=upload):
                counts[answer.status] += 1
                bar.update()
                if answer.status != CANCELLED:
                    _print(answer, paths, as_json, bar)
    except DaemonUnavailable as exc:
        sys.stderr.write(f"pspnet submit: error: {unavailable_text(exc, client.endpoint)}\n")
        return EXIT_UNAVAILABLE
    if interrupts.count:
        sys.stderr.write(f"pspnet submit: interrupted: {counts['ok']} answered, "
                         f"{counts[CANCELLED]} cancelled, {counts['error']} failed\n")
        return EXIT_INTERRUPTED
    return EXIT_FAILED if counts["error"] else 0


def upload_options(args: argparse.Namespace, endpoint: str) -> Upload | None:
    """--upload's options, or None to send paths; ValueError (one line) for flags that do
    not go together. A daemon on another host gets the bytes without being asked: it
    cannot read this host's files."""
    upload = args.upload or on_another_host(endpoint)
    if not upload:
        if args.out is not None or args.want is not None or args.daemon_out:
            raise ValueError("--out, --want and --daemon-out go with --upload (a path's "
                             "mask is written under the daemon's --out)")
        return None
    if args.ann is not None:
        raise ValueError("--ann files are read by the daemon, on its host: not with "
                         "--upload")
    want = args.want or ("png" if args.out is not None else "classes")
    return Upload(want=want, write=args.daemon_out, out_dir=args.out)


def on_another_host(endpoint: str) -> bool:
    """tcp to a host that is not this one's loopback (an ipc socket, abstract or not, is
    on this host). A malformed endpoint is not: the client says what is wrong with it."""
    try:
        return endpoint.startswith("tcp://") and not is_local(endpoint)
    except ValueError:
        return False


def _print(answer: Answer, paths: list[str], as_json: bool, bar: tqdm) -> None:
    if as_json:
        line = json.dumps(json_safe(answer.as_dict()), default=str)
    else:
        index = int(answer.id.rsplit("-", 1)[1])  # the client numbers requests in order
        line = readable(answer, shown_path(paths[index]))
    bar.write(line, file=sys.stdout)
    sys.stdout.flush()


def _usage(message: str) -> int:
    sys.stderr.write(f"pspnet submit: error: {message}\n")
    return EXIT_USAGE
