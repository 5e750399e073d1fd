"""Small real-mmseg PSPNet model directories for tests, built by `pspnet build`'s own code.

`make_model_dir` copies the package's tiny config, makes a calibrated checkpoint in the
official layout (pspnet.build_model.calibrate) and calls
`pspnet.build_model.export.build` -- the function the CLI calls, not a subprocess. Results
are cached per process: each (head, batch sizes, input size) is built once per pytest
session, under the first `tmp_dir` given.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pspnet.build_model.mmseg_model import PACKAGE_CONFIGS

TINY_CONFIG = "pspnet_r18-tiny"
CALIBRATION_SIZE = 128
# the session's models (tests/conftest.py's `mmseg_models`), which the build tests check
BATCH_SIZES = (1, 4)
INPUT_SIZE = 128        # small PSPNet input: fast on 2 cores, same code path as 500

_built: dict[tuple, Path] = {}  # the per-session cache the brief asks for


def tiny_config(tmp_dir: Path) -> Path:
    """A copy of the package's tiny PSPNet config under `tmp_dir`."""
    path = Path(tmp_dir) / f"{TINY_CONFIG}.py"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PACKAGE_CONFIGS / f"{TINY_CONFIG}.py", path)
    return path


def tiny_checkpoint(tmp_dir: Path) -> Path:
    """Calibrated weights for the tiny config, official layout (made once per session)."""
    key = ("checkpoint",)
    if key not in _built:
        from pspnet.build_model.calibrate import make_calibrated_checkpoint

        _built[key] = make_calibrated_checkpoint(
            tiny_config(tmp_dir), Path(tmp_dir) / f"{TINY_CONFIG}.pth",
            input_size=CALIBRATION_SIZE)
    return _built[key]


def make_model_dir(
    tmp_dir: Path,
    head: str = "logits",
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    input_size: int = INPUT_SIZE,
    onnx: bool = True,
) -> Path:
    """A model directory (manifest, ONNX per batch size unless not `onnx`, ATC scripts,
    torch program). `onnx=False` builds where onnxsim is missing (the GPU host)."""
    key = ("model", head, tuple(sorted(batch_sizes)), input_size, onnx)
    if key not in _built:
        from pspnet.build_model.export import build

        checkpoint = tiny_checkpoint(tmp_dir)
        sizes = "-".join(map(str, sorted(batch_sizes)))
        out = (Path(tmp_dir) / f"pspnet_tiny_{head}_{input_size}_bs{sizes}"
               f"{'' if onnx else '_no-onnx'}")
        build(tiny_config(checkpoint.parent), checkpoint, out, batch_sizes=batch_sizes,
              input_size=input_size, head=head, run_atc=False, onnx=onnx)
        _built[key] = out
    return _built[key]
