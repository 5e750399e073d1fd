"""Session fixtures: model directories and a VOC-layout folder, each built once per run."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session", autouse=True)
def curve_keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One set of CurveZMQ keys (core.keys) for the run, in $PSPNET_KEYS: clients of a tcp
    endpoint read them from there, and tests.kit.Daemon passes them to a tcp daemon."""
    from pspnet.core.keys import ENV_KEYS, write_keys

    folder = tmp_path_factory.mktemp("keys")
    write_keys(folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV_KEYS, str(folder))
        yield folder


@pytest.fixture(scope="session")
def mmseg_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The small mmseg PSPNet (calibrated weights), built by `pspnet build`'s code, per head:
    batch sizes 1 and 4 at 128x128 (tests.model_fixtures.BATCH_SIZES, INPUT_SIZE)."""
    from tests.model_fixtures import make_model_dir

    root = tmp_path_factory.mktemp("mmseg_models")
    return {head: make_model_dir(root, head=head) for head in ("logits", "labels")}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 3-conv network behind the same artifacts: for tests about plumbing, not accuracy.
    Batch sizes 1, 4 and 16 at 64x64, seed 0 (tests.tiny_model.tiny_core's default)."""
    from tests.tiny_model import make_tiny_model_dir

    root = tmp_path_factory.mktemp("tiny_models")
    return {head: make_tiny_model_dir(root, head=head, batch_sizes=(1, 4, 16),
                                      input_size=(64, 64)) for head in ("logits", "labels")}


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped trained DeepLabV3-MobileNetV2 (logits head, align_corners=True), built by
    `pspnet build`'s code: batch sizes 1 and 4 at 257x257."""
    from pspnet.build_model import trained
    from pspnet.build_model.export import build

    out = tmp_path_factory.mktemp("trained") / "model"
    build(trained.CONFIG, trained.CHECKPOINT, out, batch_sizes=(1, 4),
          input_size=trained.INPUT_SIZE, head="logits")
    return out


@pytest.fixture(scope="session")
def photos() -> list[tuple[str, np.ndarray]]:
    from pspnet.build_model.samples import sample_images

    return sample_images()


@pytest.fixture(scope="session")
def photo_files(tmp_path_factory: pytest.TempPathFactory, photos) -> list[Path]:
    """200 distinct JPEGs cut from the sample photos at VOC-like sizes."""
    folder = tmp_path_factory.mktemp("photo_files")
    rng = np.random.default_rng(7)
    paths = []
    for i in range(200):
        name, rgb = photos[i % len(photos)]
        h, w = rgb.shape[:2]
        ch, cw = int(rng.integers(h // 2, h + 1)), int(rng.integers(w // 2, w + 1))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        path = folder / f"{i:04d}_{Path(name).stem}.jpg"
        Image.fromarray(rgb[top:top + ch, left:left + cw]).save(path, quality=90)
        paths.append(path)
    return paths


def copy_files(paths: list[Path], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(p, folder / p.name)) for p in paths]


@pytest.fixture
def daemons() -> Iterator[Callable[..., object]]:
    """Start `pspnet serve` through this (tests.kit.Daemon's arguments): whatever still
    runs when the test ends (a failure midway, a child left stopped) is killed with its
    whole process group, so one failure is not left to the next test."""
    from tests.kit import Daemon

    started: list[Daemon] = []

    def start(*args: object, **kwargs: object) -> Daemon:
        daemon = Daemon(*args, **kwargs)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill_group()
