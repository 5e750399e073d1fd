"""`pspnet demo`: the embedded default, end to end, in about a minute on 2 cores.

Builds a small PSPNet from the mmseg config shipped in build_model/configs (weights
calibrated on the sample photos, not trained), starts `pspnet serve` as a real process,
submits the sample photos with stand-in ground truth (mmseg's eager prediction, so the
mIoU printed measures how faithfully the daemon reproduces mmseg), prints where the masks
are, the mIoU and images/s, and stops the daemon with SIGTERM.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "build_model" / "configs" / \
    "pspnet_r18-tiny.py"
READY_TIMEOUT_S = 120


def add_parsers(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="run the embedded default end to end (small model, sample photos)",
        description=__doc__.split("\n\n")[1])
    demo.add_argument("--out", type=Path, default=Path("demo-out"), metavar="DIR",
                      help="model, masks, ground truth and logs go here (reused next time)")
    demo.add_argument("--input-size", type=int, default=256,
                      help="model input side (the real model uses 500)")
    demo.add_argument("--backend", choices=("ort", "torch"), default="ort",
                      help="executor backend")
    demo.add_argument("--rebuild", action="store_true", help="rebuild the demo model")
    demo.set_defaults(run=run_demo)


def say(message: str) -> None:
    sys.stderr.write(f"[demo] {message}\n")
    sys.stderr.flush()


def run_demo(args: argparse.Namespace) -> int:
    out: Path = args.out.absolute()
    model_dir, images_dir, truth_dir = out / "model", out / "images", out / "ground-truth"
    masks_dir, run_dir = out / "masks", out / "run"
    started = time.monotonic()
    if args.rebuild or not (model_dir / "manifest.json").exists():
        build_demo_model(out, model_dir, args.input_size)
    images, anns = write_inputs(model_dir, images_dir, truth_dir)
    shutil.rmtree(masks_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    endpoint = f"ipc://{run_dir}/front"
    log_path = out / "daemon.log"
    say(f"starting the daemon ({args.backend}); its log: {log_path}")
    with open(log_path, "w") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "pspnet", "serve", "--model", str(model_dir),
             "--backend", args.backend, "--out", str(masks_dir), "--endpoint", endpoint,
             "--batch-size", "4", "--metrics-json", str(out / "metrics.json"),
             "--log-format", "json"], stdout=log, stderr=subprocess.STDOUT)
        try:
            return submit_and_report(daemon, endpoint, images, anns, masks_dir, started)
        finally:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(60)
            say(f"daemon stopped (exit status {daemon.returncode})")


def build_demo_model(out: Path, model_dir: Path, input_size: int) -> None:
    from build_model.calibrate import make_calibrated_checkpoint
    from build_model.export import build

    say(f"building the demo model from {DEMO_CONFIG.name} at {input_size}x{input_size} "
        "(weights calibrated on the sample photos, not trained)")
    checkpoint = make_calibrated_checkpoint(DEMO_CONFIG, out / "demo-checkpoint.pth",
                                            input_size=input_size)
    build(DEMO_CONFIG, checkpoint, model_dir, batch_sizes=(1, 4), input_size=input_size,
          head="logits")


def write_inputs(model_dir: Path, images_dir: Path, truth_dir: Path,
                 ) -> tuple[list[Path], list[Path]]:
    """The sample photos, and mmseg's eager prediction for each as ground truth."""
    from build_model.reference import Reference
    from build_model.samples import SAMPLE_DIR
    from stages.image_io import decode_image
    from stages.manifest import Manifest
    from stages.masks import write_mask

    images_dir.mkdir(parents=True, exist_ok=True)
    images = [Path(shutil.copy(p, images_dir / p.name)) for p in sorted(SAMPLE_DIR.glob("*.jpg"))]
    anns = [truth_dir / f"{p.stem}.png" for p in images]
    if not all(a.exists() for a in anns):
        say("computing stand-in ground truth with mmseg's eager model")
        reference = Reference(model_dir)
        palette = Manifest.read(model_dir).palette
        for image, ann in zip(images, anns, strict=True):
            write_mask(reference.predict(decode_image(image)), ann, palette)
    return images, anns


def submit_and_report(daemon: subprocess.Popen, endpoint: str, images: list[Path],
                      anns: list[Path], masks_dir: Path, started: float) -> int:
    from daemon.client import Client, DaemonUnavailable

    with Client(endpoint) as client:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if daemon.poll() is not None:
                say("the daemon exited during start-up; see its log")
                return 1
            try:
                client.status(timeout_s=1)
                break
            except DaemonUnavailable:
                if time.monotonic() > deadline:
                    say("the daemon did not start in time")
                    return 1
                time.sleep(0.05)        # no socket file yet: the client says so at once
        t0 = time.monotonic()
        answers = list(client.submit(images, anns))
        elapsed = time.monotonic() - t0
        status = client.status()
    failed = [a for a in answers if a.status != "ok"]
    for a in sorted(answers, key=lambda a: a.path):
        say(f"{Path(a.path).name:32} {a.status:5} {a.latency_ms:8.1f} ms  "
            f"{a.mask or a.error}")
    metrics = status.get("metrics") or {}
    print(f"masks:      {masks_dir}  ({len(answers) - len(failed)} written, "
          f"{len(failed)} failed)")
    print(f"mIoU:       {metrics.get('mIoU', float('nan')):.2f}  (vs mmseg's eager "
          f"prediction; aAcc {metrics.get('aAcc', float('nan')):.2f})")
    print(f"images/s:   {len(answers) / elapsed:.1f}  ({len(answers)} images in "
          f"{elapsed:.2f} s, end to end through the daemon)")
    print(f"demo took:  {time.monotonic() - started:.0f} s")
    return 1 if failed else 0
