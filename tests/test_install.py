"""The built wheel, installed into a fresh environment beside python-daemon, runs the demo.

Why: the project keeps the card's folders (daemon/, stages/, bench/...) at the top of the
repository, and installs them under one import package, `pspnet` (pspnet/daemon links
../daemon). Installed as top-level packages they would collide with python-daemon's
`daemon` (a dependency of Apache Airflow) and frappe-bench's `bench`. This test builds the
wheel, checks what it would put into site-packages, installs it (with the extras the demo
needs) and python-daemon into a new virtual environment, and runs `pspnet demo` there from
a folder outside the checkout, so nothing of the repository can be imported by accident.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.kit import REPO

pytestmark = pytest.mark.slow


def run(*cmd: str | Path, cwd: Path | None = None, timeout: float = 900) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{cmd}: exit {done.returncode}\n{done.stdout[-3000:]}" \
                                 f"\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def tracked_copy(into: Path) -> Path:
    """The checkout's tracked files as they are now (links kept as links), so the build
    leaves nothing behind in the repository (setuptools builds in the source folder)."""
    names = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src, dst = REPO / name, into / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        elif src.is_file():
            shutil.copy2(src, dst)
    return into


def test_the_wheel_installs_one_package_and_runs_the_demo(tmp_path):
    wheels = tmp_path / "wheels"
    source = tracked_copy(tmp_path / "source")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
        "-w", wheels, source)
    (wheel,) = wheels.glob("pspnet_daemon-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"pspnet"}, top
    assert not [n for n in names if n.startswith(("pspnet/studies", "pspnet/bench/device",
                                                  "tests/"))]
    for module in ("core/wire.py", "model/manifest.py", "stages/worker.py", "daemon/front.py",
                   "build_model/export.py", "batch/ray_batch.py", "bench/bench.py",
                   "build_model/trained/deeplabv3-mnv2-voc/deeplabv3_mnv2_voc.pth"):
        assert f"pspnet/{module}" in names, module
    print(f"FIGURE wheel {wheel.name}: {len(names)} files, top-level: {sorted(top)}")

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    import torch  # the same torch as here (CPU wheel)
    run(python, "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}")
    run(python, "-m", "pip", "install", "-q", f"{wheel}[build,bench]", "python-daemon")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = run(python, "-c", "import daemon, pspnet.daemon; "
                              "print(daemon.__file__); print(pspnet.daemon.__file__)",
                cwd=outside).split()
    assert "site-packages/daemon/" in where[0], where          # python-daemon's own
    assert "site-packages/pspnet/daemon/" in where[1], where   # ours, under pspnet
    out = run(venv / "bin" / "pspnet", "demo", "--out", outside / "demo-out", cwd=outside)
    assert "masks:" in out and "(10 written, 0 failed)" in out, out[-3000:]
    assert "fidelity:   mIoU 100.00" in out, out[-3000:]
    print(f"FIGURE installed wheel beside python-daemon: `pspnet demo` ran from {outside}")
