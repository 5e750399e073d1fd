"""`pspnet demo`: a trained model end to end, with pictures, in about a minute on 2 cores.

Builds the trained DeepLabV3-MobileNetV2 (Pascal VOC, converted from TensorFlow Lite and
shipped in build_model/trained/) with `pspnet build`, starts `pspnet serve` as a real
process, submits the sample photos and a bird photo that comes with a reference label
map, prints the largest classes of every mask, the bird's agreement with its reference,
how faithfully the daemon reproduces mmseg's own prediction (mIoU against it), images/s,
and the path of an overlay contact sheet (each photo beside its mask blended on it, with a
class legend); then stops the daemon with SIGTERM.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

READY_TIMEOUT_S = 120
CONTACT_SHEET = "contact-sheet.png"
# mmseg's own eager prediction of each photo: what the daemon's masks are scored against
# (fidelity), not a human-labelled ground truth; older demos called it ground-truth/
REFERENCE_DIR, OLD_REFERENCE_DIR = "mmseg-predictions", "ground-truth"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="run a trained model end to end on sample photos, with an overlay picture",
        description=__doc__.split("\n\n")[1])
    demo.add_argument("--out", type=Path, default=Path("demo-out"), metavar="DIR",
                      help="model, masks, mmseg's own predictions (the fidelity reference), "
                           "logs and the contact sheet go here "
                           "(the model is reused next time)")
    demo.add_argument("--input-size", type=int, default=257,
                      help="model input side; the network was trained at 257, and sides "
                           "of 8k + 1 keep its padding exactly TensorFlow's")
    demo.add_argument("--backend", choices=("ort", "torch"), default="ort",
                      help="executor backend")
    demo.add_argument("--rebuild", action="store_true", help="rebuild the demo model")
    demo.set_defaults(run=run_demo)


def say(message: str) -> None:
    sys.stderr.write(f"[demo] {message}\n")
    sys.stderr.flush()


def run_demo(args: argparse.Namespace) -> int:
    out: Path = args.out.absolute()
    model_dir, images_dir, truth_dir = out / "model", out / "images", out / REFERENCE_DIR
    masks_dir, run_dir = out / "masks", out / "run"
    started = time.monotonic()
    shutil.rmtree(out / OLD_REFERENCE_DIR, ignore_errors=True)   # an older demo's name
    if args.rebuild or not _model_is_current(model_dir, args.input_size):
        shutil.rmtree(truth_dir, ignore_errors=True)       # made by the previous model
        build_demo_model(model_dir, args.input_size)
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
            code = submit_and_report(daemon, endpoint, images, anns, masks_dir, out,
                                     model_dir, started)
        finally:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(60)
            say(f"daemon stopped (exit status {daemon.returncode})")
    print(f"demo took:  {time.monotonic() - started:.0f} s")
    return code


def _model_is_current(model_dir: Path, input_size: int) -> bool:
    """A model directory built from the shipped checkpoint at this size (not, say, the
    calibrated PSPNet an older demo left there)."""
    from pspnet.build_model.checkpoint import sha256_file
    from pspnet.build_model.trained import CHECKPOINT
    from pspnet.model.manifest import Manifest

    try:
        manifest = Manifest.read(model_dir)
    except (OSError, ValueError):
        return False
    return (manifest.input_size == (input_size, input_size)
            and manifest.source.get("checkpoint_sha256") == sha256_file(CHECKPOINT))


def build_demo_model(model_dir: Path, input_size: int) -> None:
    from pspnet.build_model.export import build
    from pspnet.build_model.trained import CHECKPOINT, CONFIG

    say(f"building the trained DeepLabV3-MobileNetV2 (VOC) from {CONFIG.name} at "
        f"{input_size}x{input_size}")
    build(CONFIG, CHECKPOINT, model_dir, batch_sizes=(1, 4), input_size=input_size,
          head="logits")


def write_inputs(model_dir: Path, images_dir: Path, truth_dir: Path,
                 ) -> tuple[list[Path], list[Path]]:
    """The sample photos and the bird, and mmseg's eager prediction for each as the
    ground truth the daemon scores (so its mIoU measures fidelity to mmseg)."""
    from pspnet.build_model.reference import Reference
    from pspnet.build_model.samples import SAMPLE_DIR
    from pspnet.build_model.trained import BIRD_PHOTO
    from pspnet.model.image_io import decode_image
    from pspnet.model.manifest import Manifest
    from pspnet.model.masks import write_mask

    images_dir.mkdir(parents=True, exist_ok=True)
    sources = [*sorted(SAMPLE_DIR.glob("*.jpg")), BIRD_PHOTO]
    images = [Path(shutil.copy(p, images_dir / p.name)) for p in sources]
    anns = [truth_dir / f"{p.stem}.png" for p in images]
    if not all(a.exists() for a in anns):
        say("computing mmseg's eager prediction of each photo (the fidelity reference)")
        reference = Reference(model_dir)
        palette = Manifest.read(model_dir).palette
        for image, ann in zip(images, anns, strict=True):
            write_mask(reference.predict(decode_image(image)), ann, palette)
    return images, anns


def submit_and_report(daemon: subprocess.Popen, endpoint: str, images: list[Path],
                      anns: list[Path], masks_dir: Path, out: Path, model_dir: Path,
                      started: float) -> int:
    from pspnet.daemon.client import Client, DaemonUnavailable

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
    for a in failed:
        say(f"{Path(a.path).name}: {a.status}: {a.error}")
    done = sorted((a for a in answers if a.status == "ok"), key=lambda a: a.path)
    sheet = report_masks(done, model_dir, out / CONTACT_SHEET)
    metrics = status.get("metrics") or {}
    print(f"masks:      {masks_dir}  ({len(done)} written, {len(failed)} failed)")
    print(f"fidelity:   mIoU {metrics.get('mIoU', float('nan')):.2f} against mmseg's own "
          f"eager prediction on the same letterboxed input (100 = the daemon reproduces "
          f"mmseg; aAcc {metrics.get('aAcc', float('nan')):.2f}; those predictions: "
          f"{out / REFERENCE_DIR})")
    print(f"images/s:   {len(answers) / elapsed:.1f}  ({len(answers)} images in "
          f"{elapsed:.2f} s, end to end through the daemon)")
    if sheet is not None:
        print(f"contact sheet: {sheet}")
    return 1 if failed else 0


def report_masks(answers: list, model_dir: Path, sheet_path: Path) -> Path | None:
    """Print each mask's largest classes and the bird's agreement; draw the sheet."""
    from PIL import Image

    from pspnet.batch.report import Row, contact_sheet, top_classes_line
    from pspnet.build_model.trained import BIRD_PHOTO, bird
    from pspnet.model.image_io import decode_image
    from pspnet.model.manifest import Manifest

    manifest = Manifest.read(model_dir)
    names = manifest.class_names
    rows = []
    print(f"model:      {manifest.network_name}, input {manifest.input_size[0]}x"
          f"{manifest.input_size[1]} (letterboxed)")
    for answer in answers:
        path = Path(answer.path)
        with Image.open(answer.mask) as im:
            labels = np.asarray(im, np.uint8)
        top = top_classes_line(labels, names)
        note = top
        print(f"{path.name:32} {top}")
        if path.name == BIRD_PHOTO.name:
            _, reference = bird()
            agreement, ious = agreement_with(labels, reference, len(names))
            note = f"vs its reference map: {agreement:.1f} % of pixels agree"
            print(f"{'':32} agreement with its reference label map: {agreement:.2f} % of "
                  "pixels; IoU " + ", ".join(f"{names[k]} {v:.1f}" for k, v in ious.items()))
        rows.append(Row(title=path.name, photo=decode_image(path), labels=labels, note=note))
    if not rows:
        return None
    return contact_sheet(rows, names, manifest.palette, sheet_path,
                         title=f"{manifest.network_name}: masks from pspnet serve")


def agreement_with(labels: np.ndarray, reference: np.ndarray,
                   num_classes: int) -> tuple[float, dict[int, float]]:
    """(percent of pixels with the reference's label, 255 ignored; IoU of each class
    holding at least 1 % of the reference's pixels). The bird's map also has a few hundred
    stray aeroplane and bicycle pixels, which would make a mean over classes meaningless."""
    from pspnet.model.labels import intersect_and_union

    scored = reference != 255
    agreement = 100.0 * float((labels == reference)[scored].mean())
    inter, union, _, area = intersect_and_union(labels, reference, num_classes)
    major = np.flatnonzero(area >= 0.01 * scored.sum())
    return agreement, {int(k): 100.0 * float(inter[k] / union[k]) for k in major}
