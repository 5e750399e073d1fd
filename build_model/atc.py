"""Ascend ATC: write the command that turns each ONNX model into an OM, run it if possible.

The script is always written (the build host rarely has the CANN toolkit; the Ascend host
runs it later). Input is uint8 NHWC, so there is no `--input_fp16_nodes`: the graph
normalises on the device. `SOC` defaults to the `--soc-version` given at build time. The
script names what the OM will be: the ONNX opset it reads (CANN 6.0 documents 9-13) and
`--precision_mode`, always explicit (ATC's default is force_fp16, so an OM built without
it computes in fp16 whatever the ONNX says). It leaves the OM at 0640: aclruntime since
2024-08 refuses a group- or other-writable model file.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pspnet.model.manifest import OM_DEFAULT_PRECISION, OM_PRECISION_MODES

OM_MODE = 0o640         # owner read/write, group read: what aclruntime accepts
_log = logging.getLogger(__name__)


def atc_script_name(batch_size: int) -> str:
    return f"pspnet_bs{batch_size}.atc.sh"


def om_name(batch_size: int) -> str:
    return f"pspnet_bs{batch_size}.om"


def write_atc_script(
    out_dir: Path, batch_size: int, input_size: tuple[int, int], soc_version: str,
    rewrites: Mapping[str, Any] | None = None, *, onnx_file: str | None = None,
    opset: int | None = None, precision: str = OM_DEFAULT_PRECISION,
) -> Path:
    """Write `pspnet_bs{N}.atc.sh` next to its ONNX (`onnx_file`, default
    `pspnet_bs{N}.onnx`, of opset `opset`); the OM computes in `precision` (fp16 or fp32).
    Returns the script's path."""
    if precision not in OM_PRECISION_MODES:
        raise ValueError(f"OM precision must be one of {', '.join(OM_PRECISION_MODES)}, "
                         f"not {precision!r}")
    height, width = input_size
    n = batch_size
    onnx_file = onnx_file or f"pspnet_bs{n}.onnx"
    mode = OM_PRECISION_MODES[precision]
    om = om_name(n)
    text = (
        "#!/bin/sh\n"
        f"# ONNX -> Ascend OM for batch size {n}; written by `pspnet build`.\n"
        + (f"# {onnx_file} is ONNX opset {opset} (CANN 6.0 documents opsets 9-13).\n"
           if opset is not None else "")
        + f"# The OM computes in {precision}: --precision_mode={mode}"
        + (" (ATC's default, as the seed ran; `pspnet build --om-precision fp32` writes "
           "must_keep_origin_dtype).\n" if precision == "fp16" else
           " (fp32 kept: slower than force_fp16 on a 310P).\n")
        + "".join(f"# {line}\n" for line in describe_rewrites(rewrites or {})) +
        "# Run on a host with the CANN toolkit: SOC=Ascend310P3 ./" + atc_script_name(n) + "\n"
        "set -e\n"
        'cd "$(dirname "$0")"\n'
        f'SOC="${{SOC:-{soc_version}}}"\n'
        "# ATC of CANN 7 and later may name its file pspnet_bsN_<os>_<arch>.om: an older\n"
        "# one of those would be taken for this run's, so it goes first\n"
        f"rm -f pspnet_bs{n}_*.om\n"
        f"atc --framework=5 --model={onnx_file} --output=pspnet_bs{n} "
        f'--input_format=ND --input_shape="image:{n},{height},{width},3;box:{n},4" '
        f'--soc_version="${{SOC}}" --precision_mode={mode} --log=error\n'
        f"for f in pspnet_bs{n}_*.om; do\n"
        f'    if [ -f "$f" ]; then mv -f "$f" {om}; fi    # the name the daemon reads\n'
        "done\n"
        "# aclruntime (2024-08 and later) refuses a group- or other-writable OM\n"
        f"chmod {OM_MODE:04o} {om}\n"
    )
    path = Path(out_dir) / atc_script_name(n)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def describe_rewrites(rewrites: Mapping[str, Any]) -> list[str]:
    """One comment line per rewrite the ONNX model carries (the OM inherits them)."""
    lines = []
    fold = rewrites.get("bn_fold") or {}
    if fold.get("applied"):
        lines.append(f"The ONNX has BatchNorm folded into {fold.get('folded')} convolutions.")
    psp = rewrites.get("psp_bottleneck") or {}
    if psp.get("applied"):
        lines.append("The ONNX has the exact PSP bottleneck rewrite (Conv + MatMul; "
                     "manifest.json, rewrites).")
    macs = rewrites.get("macs_per_image") or {}
    if macs.get("built"):
        before = macs.get("network") or macs["built"]
        lines.append(f"{macs['built'] / 1e9:.2f} GMAC per image" + (
            f" ({before / 1e9:.2f} before the rewrites)." if before != macs["built"] else "."))
    return lines


def atc_available() -> bool:
    return shutil.which("atc") is not None


def run_atc_script(script: Path, soc_version: str) -> Path:
    """Run one script with `SOC=soc_version`; return the OM path (raises if ATC fails)."""
    _log.info("running %s", script.name)
    env = dict(os.environ, SOC=soc_version)
    subprocess.run(["sh", str(script)], check=True, env=env)
    om = script.with_name(script.name.replace(".atc.sh", ".om"))
    if not om.exists():
        raise FileNotFoundError(f"{script.name} ran but {om.name} is missing")
    return om
