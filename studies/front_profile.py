"""Where the front's main thread spends its time per image (issue 27).

Why: the bench's `front ceiling` is one number (1000 / the main thread's CPU ms per
image); to cut it one must know which steps cost it. This runs the bench's setting (the
sim backend at 20,000 img/s per simulated device, labels head, no masks, synthetic photos
with stand-in ground truth) in this process, streams `--images` requests through a
started Front as the bench's e2e pass does, and reports for that pass alone:
- the main thread's CPU (time.thread_time) per image and the turns of the loop;
- the messages the front read and sent per image, by kind;
- with --profile, cProfile's top functions by own time (the profiler slows the thread
  about 2x; the shares are what to read, not the absolute figure).

    python -m studies.front_profile --model /tmp/f27/demo-labels --executors 2 --batch 64

- with --by-kind, the CPU per message kind, and each message's decode in situ against
  the same frames decoded again afterwards, back to back (the cold-cache factor);
- with --no-count, without counting messages (counting decodes each one twice).

(py-spy is not installed on the shared host; cProfile sees only the main thread, which
is the thread the figure is about.)
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import gc
import io
import pstats
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from pspnet.bench import inputs as sources
from pspnet.bench.e2e import default_backlog, settle
from pspnet.core import wire
from pspnet.core.config import PipelineConfig
from pspnet.daemon.front import Front


def counting(front: Front, counts: collections.Counter[str]) -> None:
    """Wrap the front's message handling and send so each message is counted by kind and
    by the sender's stage (the message is decoded twice: counting costs CPU too)."""
    handle, send = front._handle, front._send

    def counted_handle(wid, own, frames):          # type: ignore[no-untyped-def]
        counts[f"in {type(wire.decode(frames)).__name__} ({wid.stage.value})"] += 1
        return handle(wid, own, frames)

    def counted_send(worker, frames):              # type: ignore[no-untyped-def]
        counts[f"out ({worker.stage.value})"] += 1
        return send(worker, frames)

    front._handle = counted_handle                  # type: ignore[method-assign]
    front._send = counted_send                      # type: ignore[method-assign]


def timing_steps(front: Front, spent: collections.Counter[str]) -> None:
    """Wrap the loop's steps (the control socket's poll, read, supervise, dispatch,
    take_answers) so each one's main-thread CPU is summed in `spent` (ms)."""
    clock = time.thread_time

    def timed(name: str, fn):                       # type: ignore[no-untyped-def]
        def wrapper(*a, **k):                       # type: ignore[no-untyped-def]
            t = clock()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += (clock() - t) * 1e3
        return wrapper

    for name in ("read", "supervise", "dispatch", "take_answers"):
        setattr(front, name, timed(name, getattr(front, name)))
    front.control.poll = timed("control.poll", front.control.poll)   # type: ignore


class ByKind:
    """--by-kind: the main thread's CPU in `Front._handle` per message kind, and each
    message's decode timed where it ran (in situ) and again afterwards, replayed back to
    back from a copy of its frames (hot caches): their ratio is what running among the
    workers on a shared core costs the same code."""

    def __init__(self, front: Front) -> None:
        self.handle_ms: collections.Counter[str] = collections.Counter()
        self.count: collections.Counter[str] = collections.Counter()
        self.decoded: list[tuple[list[bytes], float, str]] = []
        self._decode, self._kind = wire.decode, ""
        handle, clock = front._handle, time.thread_time

        def decode(frames, *a, **k):                   # type: ignore[no-untyped-def]
            t = clock()
            msg = self._decode(frames, *a, **k)
            spent = clock() - t
            self._kind = type(msg).__name__
            self.decoded.append(([bytes(getattr(f, "buffer", f)) for f in frames], spent,
                                 self._kind))
            return msg

        def timed_handle(wid, own, frames):            # type: ignore[no-untyped-def]
            t = clock()
            try:
                return handle(wid, own, frames)
            finally:
                self.handle_ms[self._kind] += (clock() - t) * 1e3
                self.count[self._kind] += 1

        wire.decode = decode                            # type: ignore[assignment]
        front._handle = timed_handle                    # type: ignore[method-assign]

    def report(self, n: int) -> str:
        wire.decode = self._decode                      # type: ignore[assignment]
        in_situ: collections.Counter[str] = collections.Counter()
        hot: collections.Counter[str] = collections.Counter()
        for _, spent, kind in self.decoded:
            in_situ[kind] += spent
        for _ in range(3):
            for frames, _, kind in self.decoded:
                t = time.thread_time()
                self._decode(frames)
                hot[kind] += (time.thread_time() - t) / 3
        lines = ["by kind: messages/image, handled ms/image, us/message; decode in situ / "
                 "replayed hot, us/message"]
        for kind, ms in self.handle_ms.most_common():
            c = self.count[kind]
            lines.append(f"  {kind:10s} {c / n:.3f} {ms / n:.4f} {ms * 1e3 / c:6.1f}; decode "
                         f"{in_situ[kind] * 1e6 / c:6.1f} / {hot[kind] * 1e6 / c:5.1f} "
                         f"(x{in_situ[kind] / max(hot[kind], 1e-9):.1f})")
        return "\n".join(lines)


class GcTime:
    """Main-thread CPU spent in the cyclic garbage collector, by generation (gc.callbacks)."""

    def __init__(self) -> None:
        self.spent_ms: collections.Counter[int] = collections.Counter()
        self.runs: collections.Counter[int] = collections.Counter()
        self._t = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t = time.thread_time()
        else:
            self.spent_ms[info["generation"]] += (time.thread_time() - self._t) * 1e3
            self.runs[info["generation"]] += 1


def user_system_ticks() -> tuple[int, int]:
    """This (main) thread's user and system CPU, in clock ticks (/proc)."""
    with open(f"/proc/self/task/{threading.get_native_id()}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def one_pass(front: Front, paths: list[Path], truths: list[Path | None], backlog: int,
             tag: str, profile: cProfile.Profile | None) -> dict[str, float]:
    requests = [wire.Request(f"{tag}-{i}", str(p), None if t is None else str(t))
                for i, (p, t) in enumerate(zip(paths, truths, strict=True))]
    turns = 0
    poll = front.poll

    def counted_poll(timeout_ms, starting=False):   # type: ignore[no-untyped-def]
        nonlocal turns
        turns += 1
        return poll(timeout_ms, starting)

    front.poll = counted_poll                        # type: ignore[method-assign]
    ticks0 = user_system_ticks()
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    if profile is not None:
        profile.enable()
    answered = sum(1 for _ in front.run(requests, backlog=backlog))
    if profile is not None:
        profile.disable()
    cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
    user, system = (b - a for a, b in zip(ticks0, user_system_ticks(), strict=True))
    del front.poll
    return {"images": answered, "main_ms_per_image": cpu * 1e3 / answered,
            "img_s": answered / wall, "turns_per_image": turns / answered,
            "kernel_share": system / (user + system) if user + system else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True,
                        help="a model directory (the sim backend reads its manifest)")
    parser.add_argument("--executors", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--synthetic", type=int, default=96)
    parser.add_argument("--img-s", default="20000", help="each simulated device's rate")
    parser.add_argument("--coalesce-ms", type=float, default=5.0,
                        help="the workers' --coalesce-ms (serve's default: 5)")
    parser.add_argument("--profile", action="store_true", help="cProfile the timed pass")
    parser.add_argument("--steps", action="store_true",
                        help="the main thread's CPU per step of the loop (thread_time)")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="gc.freeze() before the timed pass (start-up's objects are "
                             "never traversed by a collection again)")
    parser.add_argument("--by-kind", action="store_true",
                        help="CPU per message kind, and each decode in situ against the "
                             "same frames replayed hot afterwards (implies --no-count)")
    parser.add_argument("--no-count", action="store_true",
                        help="no messages by kind (counting decodes each message twice, "
                             "which adds to the main thread's figure)")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    cfg = PipelineConfig(model_dir=args.model, backend="sim",
                         devices=("sim",) * args.executors,
                         backend_options={"img_s": args.img_s, "head": "labels"},
                         write_masks=False, coalesce_ms=args.coalesce_ms)
    cfg = replace(cfg, batch_size=args.batch)
    with tempfile.TemporaryDirectory(prefix="front-profile-") as tmp:
        feed = sources.synthetic(args.synthetic, Path(tmp))
        paths = [feed.paths[i % len(feed.paths)] for i in range(args.images)]
        truths = [feed.truths[i % len(feed.truths)] for i in range(args.images)]
        backlog = default_backlog(args.batch, cfg.preprocess_workers,
                                  cfg.postprocess_workers)
        with Front(cfg) as front:
            settle(front)
            one_pass(front, paths[:256], truths[:256], backlog, "warm", None)
            counts: collections.Counter[str] = collections.Counter()
            if not (args.no_count or args.by_kind):
                counting(front, counts)
            kinds = ByKind(front) if args.by_kind else None
            spent: collections.Counter[str] = collections.Counter()
            if args.steps:
                timing_steps(front, spent)
            profile = cProfile.Profile(time.thread_time) if args.profile else None
            if args.gc_freeze:
                gc.freeze()                 # what start-up made: never traversed again
            collections_timed = GcTime()
            gc.callbacks.append(collections_timed)
            row = one_pass(front, paths, truths, backlog, "timed", profile)
            gc.callbacks.remove(collections_timed)
    n = row["images"]
    print(f"{args.executors} executors, batch {args.batch}: front main thread "
          f"{row['main_ms_per_image']:.3f} ms/image (ceiling "
          f"{1000 / row['main_ms_per_image']:.0f} img/s), e2e {row['img_s']:.0f} img/s, "
          f"{row['turns_per_image']:.2f} loop turns/image, "
          f"{row['kernel_share']:.0%} of it in the kernel"
          + (" [profiled]" if profile is not None else ""))
    print("messages per image: " + ", ".join(
        f"{k} {v / n:.3f}" for k, v in sorted(counts.items())))
    frozen = f", frozen {gc.get_freeze_count()}" if args.gc_freeze else ""
    print("garbage collector: " + ", ".join(
        f"gen{g} {collections_timed.runs[g]} runs {collections_timed.spent_ms[g] / n:.4f} "
        "ms/image" for g in sorted(collections_timed.runs))
          + f" (tracked objects at the end: {len(gc.get_objects())}{frozen})")
    if kinds is not None:
        print(kinds.report(n))
    if spent:
        print("main-thread CPU per image by step (ms): " + ", ".join(
            f"{k} {v / n:.4f}" for k, v in spent.most_common())
              + f"; the rest {row['main_ms_per_image'] - sum(spent.values()) / n:.4f}")
    if profile is not None:
        out = io.StringIO()
        stats = pstats.Stats(profile, stream=out).sort_stats("tottime")
        stats.print_stats(args.top)
        stats.sort_stats("cumulative").print_callees(r"front.py.*\((read|_handle|_answer|dispatch)\)")
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
