# pspnet-daemon in a container. Two targets:
#   serve (default)  `pspnet serve`: the daemon, CPU torch and onnxruntime
#   ray              the same plus Ray Data (`pip install .[ray]`), for the KubeRay RayJob
#                    of `pspnet batch` (deploy/rayjob.yaml): head and workers run this image
#
#   docker build -t pspnet-daemon:cpu .
#   docker build --target ray -t pspnet-daemon:ray-cpu .
#
# The CUDA variant is the same file with PyTorch's CUDA wheels, which carry the CUDA and
# cuDNN libraries themselves (the node needs only the NVIDIA driver and the device
# plugin); the torch backend then runs on cuda:0 (deploy/daemon.yaml):
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 \
#       -t pspnet-daemon:cuda .
#   docker build --target ray --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 \
#       -t pspnet-daemon:ray-cuda .
# The ort backend on a GPU would also need onnxruntime-gpu in place of onnxruntime.
#
# The model directory (made by `pspnet build`, which this image does not include: it needs
# mmsegmentation) and the images are mounted, not baked in.

FROM python:3.11-slim-bookworm AS serve

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# libturbojpeg0: PyTurboJPEG loads it at run time (Debian 12's 2.1.5; PyTurboJPEG < 2).
# Not pinned to a Debian revision: security updates replace it in the archive.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libturbojpeg0 \
    && rm -rf /var/lib/apt/lists/*

# torch first, from the index that decides CPU or CUDA; the project's own `torch>=2.1`
# is then satisfied and pip does not fetch the default (CUDA) build.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

WORKDIR /opt/pspnet
COPY pyproject.toml README.md ./
# pspnet/ links the other folders in (pspnet/daemon -> ../daemon): copy them all
COPY pspnet ./pspnet
COPY core ./core
COPY model ./model
COPY stages ./stages
COPY daemon ./daemon
COPY build_model ./build_model
COPY batch ./batch
COPY bench ./bench
# Not root; a home for the daemon's private runtime directory and torch.compile's cache.
RUN pip install . \
    && useradd --create-home --uid 10001 pspnet
USER 10001
WORKDIR /home/pspnet
ENV XDG_RUNTIME_DIR=/home/pspnet/run

# 5555: clients (pspnet submit --endpoint tcp://HOST:5555); 9400: Prometheus /metrics
EXPOSE 5555 9400
# SIGTERM drains every accepted request, then exits 0 (see `pspnet serve --help`)
STOPSIGNAL SIGTERM
ENTRYPOINT ["pspnet"]
CMD ["serve", "--model", "/models/current", "--out", "/data/masks", \
     "--endpoint", "tcp://0.0.0.0:5555", "--allow-root", "/data", \
     "--metrics-port", "9400", "--metrics-host", "0.0.0.0"]


FROM serve AS ray

USER 0
# wget: KubeRay's default health probes of Ray pods call it. Ray as the `ray` extra asks
# (pyproject.toml), at the version the RayJob's rayVersion names: head, workers and the
# job's driver must all run the same Ray.
ARG RAY_VERSION=2.60.0
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/* \
    && pip install "ray[data]==${RAY_VERSION}"
USER 10001
ENTRYPOINT []
CMD ["pspnet", "batch", "--help"]
