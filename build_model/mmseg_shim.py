"""Let mmsegmentation 1.2.2 import on mmcv-lite, which has no compiled `mmcv._ext`.

Why: `import mmseg.models` runs unguarded `from mmcv.ops import ...` (point_sample in
`mmseg/utils/mask_classification.py`, `models/utils/point_sample.py`,
`decode_heads/san_head.py`; sigmoid_focal_loss in `losses/focal_loss.py`), and importing
mmcv-lite's `mmcv.ops` fails at once with `No module named 'mmcv._ext'`. Building full mmcv
from source takes more than 25 minutes and PSPNet needs none of its compiled ops.

What `install()` does, only when the compiled ops are NOT importable (a full mmcv, when
installed, is used as is), and before mmseg is imported: register a stand-in module as
`mmcv.ops` whose names resolve as follows.
- `point_sample` (and `bilinear_grid_sample`): the real functions, loaded from mmcv-lite's
  own pure-PyTorch file `mmcv/ops/point_sample.py`.
- `sigmoid_focal_loss` (imported unguarded, used only by a training loss): a callable that
  raises RuntimeError when called.
- any other name: raises ModuleNotFoundError on access, which is exactly what mmseg's
  guarded imports (`try: from mmcv.ops import X / except ModuleNotFoundError`) expect, so
  the heads that need compiled ops (CCHead, PSAHead, ...) are disabled as on any install
  without them.
Nothing here changes numbers: PSPNet's modules never touch the stand-in.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

STAND_IN_FLAG = "__pspnet_stand_in__"
_PURE_PYTHON = {"point_sample": "point_sample", "bilinear_grid_sample": "point_sample"}
_CALL_FAILS = ("sigmoid_focal_loss",)


def compiled_ops_available() -> bool:
    """True when mmcv's compiled extension exists (full mmcv), so no shim is needed."""
    if importlib.util.find_spec("mmcv") is None:
        return False
    return importlib.util.find_spec("mmcv._ext") is not None


def install() -> bool:
    """Register the stand-in `mmcv.ops` if needed; True when the stand-in is in place.

    Idempotent. Call before the first `import mmseg...`.
    """
    current = sys.modules.get("mmcv.ops")
    if current is not None:
        return bool(getattr(current, STAND_IN_FLAG, False))
    if compiled_ops_available():
        return False
    import mmcv

    ops = _StandInOps("mmcv.ops", __doc__)
    ops.__path__ = []  # a package, so `import mmcv.ops.x` fails cleanly instead of oddly
    setattr(ops, STAND_IN_FLAG, True)
    ops_dir = Path(mmcv.__file__).parent / "ops"
    for name, file_stem in _PURE_PYTHON.items():
        module = _load_pure_python(ops_dir / f"{file_stem}.py", f"mmcv.ops.{file_stem}")
        if module is not None:
            setattr(ops, name, getattr(module, name))
    for name in _CALL_FAILS:
        setattr(ops, name, _fails_when_called(name))
    sys.modules["mmcv.ops"] = ops
    mmcv.ops = ops
    return True


class _StandInOps(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ModuleNotFoundError(
            f"mmcv.ops.{name} needs mmcv's compiled ops (mmcv._ext), which mmcv-lite lacks; "
            "install full mmcv to use it", name="mmcv._ext")


def _load_pure_python(path: Path, module_name: str) -> types.ModuleType | None:
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def _fails_when_called(name: str):
    def stand_in(*args, **kwargs):
        raise RuntimeError(f"mmcv.ops.{name} needs mmcv's compiled ops (mmcv._ext), which "
                           "mmcv-lite lacks; install full mmcv to use it")

    stand_in.__name__ = name
    return stand_in
