#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what the GPU machine lacks for run.sh, on a machine with PyPI
# and Debian's archive: cp312 manylinux x86_64 wheels, no dependencies resolved (each one the
# device lacks is named here), and Debian 12's libturbojpeg.so.0 for PyTurboJPEG.
#
#   bash studies/device/fetch_wheels.sh            (WHL_DIR=.whl, PY=.venv/bin/python)
#
# The device image already has numpy, torch, opencv-python-headless, pillow, msgpack,
# matplotlib, scipy, pyyaml, packaging, rich, pygments, markdown-it-py, mdurl, regex, onnx,
# onnx-ir, onnxscript, onnxruntime, setuptools (../../.library/device/KINDS.md's list).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
WHL_DIR=${WHL_DIR:-.whl}
PY=${PY:-.venv/bin/python}
mkdir -p "$WHL_DIR"

WHEELS=(
    pyzmq==27.3.0            # daemon: ZeroMQ (bundles libzmq)
    structlog==26.1.0        # daemon: logs
    watchdog==7.1.0          # daemon: --watch
    mmengine==0.10.7         # build: config + registry
    mmcv-lite==2.1.0         # build: mmcv without compiled ops (build_model/mmseg_shim.py)
    mmsegmentation==1.2.2    # build: the PSPNet config and modules
    addict==2.4.0            # mmengine, mmcv
    yapf==0.43.0             # mmengine, mmcv
    platformdirs==4.14.8     # yapf
    termcolor==3.3.0         # mmengine
    ftfy==6.3.1              # mmseg imports it undeclared
    wcwidth==0.9.4           # ftfy, prettytable
    prettytable==3.18.0      # mmseg
    pytest==9.2.0            # run.sh's cuda-tests step: tests/stages/test_backends.py -k cuda
    pluggy==1.7.0            # pytest
    iniconfig==2.3.1         # pytest
    pytest-timeout==2.4.0    # pyproject's `timeout` option
)
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_26_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHL_DIR" "${WHEELS[@]}"

# PyTurboJPEG 1.x (pyproject pins <2: Debian 12's libturbojpeg is 2.1) is an sdist only on
# PyPI; it is one pure-Python file, so a locally built py3-none-any wheel is the same thing.
"$PY" -m pip wheel --no-deps --no-binary=PyTurboJPEG -w "$WHL_DIR" PyTurboJPEG==1.8.3

# libturbojpeg.so.0 (the TurboJPEG API; neither OpenCV nor Pillow ships it): Debian 12's
# libturbojpeg0, which needs only libc6 >= 2.14. run.sh puts its folder on LD_LIBRARY_PATH,
# PyTurboJPEG's last lookup, and registers it with ldconfig if that is not enough.
tmp=$(mktemp -d)
(cd "$tmp" && apt-get download libturbojpeg0 && dpkg -x libturbojpeg0_*.deb x)
mkdir -p "$WHL_DIR/libturbojpeg"
cp "$tmp"/x/usr/lib/x86_64-linux-gnu/libturbojpeg.so.0.* "$WHL_DIR/libturbojpeg/libturbojpeg.so.0"
cp "$tmp"/x/usr/share/doc/libturbojpeg0/copyright "$WHL_DIR/libturbojpeg/copyright"
echo "libturbojpeg.so.0 from Debian package $(basename "$tmp"/libturbojpeg0_*.deb)" \
    "(apt-get download libturbojpeg0; dpkg -x). Needs only libc6 >= 2.14." \
    >"$WHL_DIR/libturbojpeg/SOURCE.txt"
rm -rf "$tmp"
ls -la "$WHL_DIR" "$WHL_DIR/libturbojpeg"
du -sh "$WHL_DIR"
