"""Where a lone image's time goes on an idle pipeline (issue 27's idle latency).

Why: `studies/idle_latency.py` gives one number, latency minus the serial loop. To remove
a wait one must see where the time is. This starts a Front in this process with the
defaults on the demo model (as `pspnet serve` would, without the door and the client),
sends one photo at a time to the idle pipeline, and timestamps what the front hears:
- dispatched: the front sent the request to the preprocess worker;
- decoded: the preprocess worker's "handed" (decode + letterbox + pixels sent on);
- in batch: the executor's "took" (its batch is on the device);
- inferred: the executor's "handed" (the batch is done and its output sent on);
- answered: the postprocess worker's answer (labels + classes + areas).

Each worker sends its first note after a quiet slice at once, so on an idle pipeline these
are the moments themselves, not a slice later. (An executor that takes and hands on
within one slice sends only "handed": then "in batch" is not seen.) The client and the
door are not in this path; `idle_latency` includes them.

    python -m studies.lone_trace --model /tmp/f27/idle/model
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from pspnet.bench.e2e import settle
from pspnet.core import wire
from pspnet.core.config import PipelineConfig
from pspnet.core.pipeline import Stage
from pspnet.daemon.front import Front

STEPS = ("dispatched", "decoded", "in batch", "inferred", "answered")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--photo", type=Path, default=None,
                        help="default: the 500 x 375 sample photo idle_latency sends")
    parser.add_argument("--warm", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--gap-s", type=float, default=0.3, help="idle between images")
    parser.add_argument("--front-run", action="store_true",
                        help="instead: ms of one image through Front.run on the idle "
                             "pipeline (the in-process path of bench, eval and batch)")
    args = parser.parse_args(argv)
    if args.photo is None:
        from pspnet.build_model.samples import SAMPLE_DIR
        from studies.idle_latency import PHOTO

        args.photo = SAMPLE_DIR / PHOTO
    if args.front_run:
        return front_run(args)
    seen: dict[str, float] = {}
    with Front(PipelineConfig(model_dir=args.model)) as front:
        handle, send = front._handle, front._send

        def traced_handle(wid, own, frames):        # type: ignore[no-untyped-def]
            now = time.perf_counter()
            msg = wire.decode(frames)
            if isinstance(msg, wire.Handed):
                if msg.took:                         # a "took" riding in it
                    seen.setdefault("in batch", now)
                seen.setdefault("decoded" if wid.stage == Stage.PREPROCESS else "inferred",
                                now)
            elif isinstance(msg, wire.Took):
                seen.setdefault("in batch", now)
            elif isinstance(msg, wire.Result | wire.Results):
                seen.setdefault("answered", now)
            return handle(wid, own, frames)

        def traced_send(worker, frames):              # type: ignore[no-untyped-def]
            if worker.stage == Stage.PREPROCESS:
                seen.setdefault("dispatched", time.perf_counter())
            return send(worker, frames)

        front._handle, front._send = traced_handle, traced_send   # type: ignore[method-assign]
        settle(front)
        rows = []
        for i in range(args.warm + args.repeats):
            seen.clear()
            start = time.perf_counter()
            front.submit(wire.Request(str(i), str(args.photo.absolute())))
            while not front.poll(50):
                pass
            done = time.perf_counter()
            if i >= args.warm:
                rows.append({k: (seen[k] - start) * 1e3 for k in STEPS if k in seen}
                            | {"total": (done - start) * 1e3})
            time.sleep(args.gap_s)
    print(f"ms after submit, median of {len(rows)} lone images ({args.gap_s} s apart):")
    last = 0.0
    for key in (*STEPS, "total"):
        got = [r[key] for r in rows if key in r]
        if not got:
            print(f"  {key:10s} not seen (the executor's took went with its handed)")
            continue
        at = statistics.median(got)
        print(f"  {key:10s} {at:7.2f}  (+{at - last:.2f})  seen {len(got)}/{len(rows)}")
        last = at
    return 0


def front_run(args: argparse.Namespace) -> int:
    """One image at a time through Front.run, `gap_s` apart (what came in while idle, the
    workers' heartbeats, is read first, so the run starts with nothing waiting)."""
    out = []
    with Front(PipelineConfig(model_dir=args.model)) as front:
        settle(front)
        for i in range(args.warm + args.repeats):
            front.poll(0)
            start = time.perf_counter()
            list(front.run([wire.Request(str(i), str(args.photo.absolute()))]))
            if i >= args.warm:
                out.append((time.perf_counter() - start) * 1e3)
            time.sleep(args.gap_s)
    print(f"one image through Front.run: median {statistics.median(out):.1f} ms of "
          f"{len(out)} ({', '.join(f'{x:.1f}' for x in out)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
