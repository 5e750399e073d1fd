"""pspnet.build_model.mmseg_shim: mmseg imports on mmcv-lite, and nothing is faked silently.

Each case runs in a fresh interpreter: the shim changes `sys.modules` for good.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_stand_in_on_mmcv_lite():
    out = _python("""
        import importlib.util, pytest
        from pspnet.build_model import mmseg_shim
        assert importlib.util.find_spec("mmcv._ext") is None, "full mmcv: nothing to test"
        assert mmseg_shim.install() is True
        assert mmseg_shim.install() is True                       # idempotent
        import mmseg.models                                       # the failure it fixes
        from mmseg.models.decode_heads import psp_head, cc_head, psa_head
        import mmcv.ops
        assert mmcv.ops.point_sample.__module__ == "mmcv.ops.point_sample"
        assert cc_head.CrissCrossAttention is None and psa_head.PSAMask is None
        with pytest.raises(ModuleNotFoundError, match="compiled ops"):
            mmcv.ops.nms
        with pytest.raises(ModuleNotFoundError):
            from mmcv.ops import DeformConv2d  # noqa: F401
        with pytest.raises(RuntimeError, match="compiled ops"):
            mmcv.ops.sigmoid_focal_loss(None, None)
        print("ok")
    """)
    assert out.strip() == "ok"


def test_real_ops_are_left_alone():
    out = _python("""
        import sys, types
        from pspnet.build_model import mmseg_shim
        mmseg_shim.compiled_ops_available = lambda: True         # as with full mmcv
        assert mmseg_shim.install() is False
        assert "mmcv.ops" not in sys.modules
        real = types.ModuleType("mmcv.ops")                      # already imported ops
        sys.modules["mmcv.ops"] = real
        assert mmseg_shim.install() is False and sys.modules["mmcv.ops"] is real
        print("ok")
    """)
    assert out.strip() == "ok"
