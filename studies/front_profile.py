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

(py-spy is not installed on the shared host; cProfile sees only the main thread, which
is the thread the figure is about.)
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import pstats
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from pspnet.bench import inputs as sources
from pspnet.bench.e2e import default_backlog, settle
from pspnet.core import wire
from pspnet.core.config import PipelineConfig
from pspnet.daemon.front import Front


def counting(front: Front, counts: collections.Counter[str]) -> None:
    """Wrap the front's decode and send so each message is counted by kind."""
    decode, send = wire.decode, front._send

    def counted_decode(frames, *a, **k):          # type: ignore[no-untyped-def]
        msg = decode(frames, *a, **k)
        counts["in " + type(msg).__name__] += 1
        return msg

    def counted_send(worker, frames):              # type: ignore[no-untyped-def]
        counts["out"] += 1
        return send(worker, frames)

    wire.decode = counted_decode                    # the front module reads wire.decode
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
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    if profile is not None:
        profile.enable()
    answered = sum(1 for _ in front.run(requests, backlog=backlog))
    if profile is not None:
        profile.disable()
    cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
    del front.poll
    return {"images": answered, "main_ms_per_image": cpu * 1e3 / answered,
            "img_s": answered / wall, "turns_per_image": turns / answered}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True,
                        help="a model directory (the sim backend reads its manifest)")
    parser.add_argument("--executors", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--synthetic", type=int, default=96)
    parser.add_argument("--img-s", default="20000", help="each simulated device's rate")
    parser.add_argument("--profile", action="store_true", help="cProfile the timed pass")
    parser.add_argument("--steps", action="store_true",
                        help="the main thread's CPU per step of the loop (thread_time)")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    cfg = PipelineConfig(model_dir=args.model, backend="sim",
                         devices=("sim",) * args.executors,
                         backend_options={"img_s": args.img_s, "head": "labels"},
                         write_masks=False)
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
            counting(front, counts)
            spent: collections.Counter[str] = collections.Counter()
            if args.steps:
                timing_steps(front, spent)
            profile = cProfile.Profile(time.thread_time) if args.profile else None
            row = one_pass(front, paths, truths, backlog, "timed", profile)
    n = row["images"]
    print(f"{args.executors} executors, batch {args.batch}: front main thread "
          f"{row['main_ms_per_image']:.3f} ms/image (ceiling "
          f"{1000 / row['main_ms_per_image']:.0f} img/s), e2e {row['img_s']:.0f} img/s, "
          f"{row['turns_per_image']:.2f} loop turns/image"
          + (" [profiled]" if profile is not None else ""))
    print("messages per image: " + ", ".join(
        f"{k} {v / n:.3f}" for k, v in sorted(counts.items())))
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
