# Sourced by scripts/demo and scripts/test: make .venv once, reinstall only when
# pyproject.toml changes. Idempotent; needs python3 >= 3.11 and network to PyPI.
#
# PSPNET_TORCH picks the torch build: unset, torch 2.13.0's CPU wheel; a version (2.13.0);
# or a CUDA tag of PyTorch's wheel index, for the torch backend on a GPU:
#   PSPNET_TORCH=cu126 scripts/demo     # torch 2.13.0 built for CUDA 12.6 (as the Dockerfile's
#                                       # TORCH_INDEX=https://download.pytorch.org/whl/cu126)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PSPNET_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if ! ldconfig -p 2>/dev/null | grep -q libturbojpeg; then
    # PyTurboJPEG loads libjpeg-turbo's TurboJPEG library at run time.
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "installing libturbojpeg0 (apt)" >&2
        apt-get update -qq >/dev/null && apt-get install -y -qq libturbojpeg0 >/dev/null
    else
        echo "error: libturbojpeg is missing: install libturbojpeg0 (Debian/Ubuntu) or libjpeg-turbo" >&2
        exit 2
    fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
STAMP="$VENV/.pspnet-installed"
TORCH_VERSION=2.13.0
WANT="$( (cat "$ROOT/pyproject.toml" "$ROOT/scripts/venv.sh"; echo "${PSPNET_TORCH:-}") \
    | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "installing into $VENV (first run takes a few minutes)" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    # CPU torch first: on these machines torch==2.13.0 is a local CPU wheel; an unpinned
    # torch would pull a multi-GB CUDA build.
    case "${PSPNET_TORCH:-$TORCH_VERSION}" in
        cu*) "$VENV/bin/python" -m pip install -q --index-url \
                 "https://download.pytorch.org/whl/$PSPNET_TORCH" "torch==$TORCH_VERSION" ;;
        *) "$VENV/bin/python" -m pip install -q "torch==${PSPNET_TORCH:-$TORCH_VERSION}" ;;
    esac
    # convert: the TFLite reader that tests/build_model/test_tflite_convert.py checks the shipped
    # checkpoint with (that test skips where ../shared/models is absent)
    "$VENV/bin/python" -m pip install -q -e "$ROOT[build,bench,test,convert,ray]"
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
