# visionlab with CUDA PyTorch. Build:  bash scripts/build-image.sh   (it runs `docker build` with the secrets below)
# Run:  docker run --gpus all --ipc=host --user $(id -u):$(id -g) -v $PWD/runs:/workspace/runs -v visionlab-cache:/cache \
#         visionlab fit --config configs/trainer/gpu.yaml --config configs/data/fashion_mnist.yaml \
#                       --config configs/classification/resnet18.yaml
#
# Two stages on the system the pins are tested on (Debian 12, Python 3.11). The build stage compiles what needs a
# compiler (lock/build.txt: FFCV's C extension) into wheels; the runtime stage has only runtime libraries and a
# venv filled from the hashed lock files, in layers that change only when pins change (torch + CUDA wheels first,
# then the rest), with the code copied last. PyPI's torch wheel carries its CUDA runtime: the host needs only the
# NVIDIA driver and the container toolkit (--gpus all).
#
# Build secrets (BuildKit; never stored in a layer): `pipconf` = a pip.conf (index URLs of the local mirrors),
# `ca` = the CA bundle pip trusts (TLS-inspecting proxies). scripts/build-image.sh makes both from the host's pip.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential pkg-config libturbojpeg0-dev \
      libopencv-core-dev libopencv-imgproc-dev \
 && (python3 -c 'import os, sysconfig; assert os.path.exists(sysconfig.get_paths()["include"] + "/Python.h")' \
     || apt-get install -y --no-install-recommends python3-dev) \
 && rm -rf /var/lib/apt/lists/*
# FFCV's setup.py asks pkg-config for `opencv4` and its code includes <opencv2/opencv.hpp>: with libopencv-dev that
# is every OpenCV module (~470 Debian packages, minutes of a cold build), but FFCV calls only core and imgproc
# (its extension links just those two). A pkg-config file and module list naming those two build the same extension.
RUN mkdir -p /opt/opencv4/opencv2 \
 && printf '#define HAVE_OPENCV_CORE\n#define HAVE_OPENCV_IMGPROC\n' > /opt/opencv4/opencv2/opencv_modules.hpp \
 && printf 'Name: opencv4\nDescription: OpenCV core + imgproc\nVersion: 4.6.0\nCflags: -I/opt/opencv4 -I/usr/include/opencv4\nLibs: -lopencv_imgproc -lopencv_core\n' \
      > /opt/opencv4/opencv4.pc
ENV PKG_CONFIG_PATH=/opt/opencv4
COPY lock/build.txt /tmp/lock/
RUN --mount=type=secret,id=pipconf --mount=type=secret,id=ca \
    python3 -m venv /opt/build \
 && PIP_CONFIG_FILE=/run/secrets/pipconf /opt/build/bin/pip wheel --use-pep517 --no-deps --require-hashes \
      -r /tmp/lock/build.txt -w /wheels

FROM ${BASE_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# FFCV's extension links libturbojpeg and OpenCV's core/imgproc; the opencv-python wheel needs libGL and glib;
# dataset-fashion-mnist is the default demo dataset (no download at run time).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libturbojpeg0 libopencv-imgproc406 libgl1 libglib2.0-0 \
      dataset-fashion-mnist \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY lock/torch.txt /tmp/lock/
RUN --mount=type=secret,id=pipconf --mount=type=secret,id=ca \
    PIP_CONFIG_FILE=/run/secrets/pipconf pip install --no-deps --require-hashes -r /tmp/lock/torch.txt
COPY lock/runtime.txt /tmp/lock/
RUN --mount=type=secret,id=pipconf --mount=type=secret,id=ca \
    PIP_CONFIG_FILE=/run/secrets/pipconf pip install --no-deps --require-hashes -r /tmp/lock/runtime.txt
# the wheels of lock/build.txt, built (from hash-checked sources) by the build stage; nothing else of it is kept
RUN --mount=type=bind,from=build,source=/wheels,target=/tmp/wheels \
    pip install --no-deps --no-index /tmp/wheels/*.whl && pip check

# Non-root by default; `--user $(id -u):$(id -g)` works too: HOME, the caches (~/.cache -> /cache: .beton files,
# torch, numba, triton) and runs/ are writable by any uid. Mount /cache, /data and /workspace/runs to keep them.
ENV HOME=/home/visionlab USER=visionlab NUMBA_CACHE_DIR=/cache/numba TRITON_CACHE_DIR=/cache/triton \
    MPLCONFIGDIR=/cache/matplotlib
# What the NVIDIA container toolkit (and hooks such as Apptainer's --nv) read: mount the driver's compute libraries
# (libcuda.so.1); everything else CUDA needs is in the torch wheels.
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN useradd --uid 1000 --home-dir /home/visionlab --no-create-home --shell /bin/bash visionlab \
 && mkdir -p /home/visionlab /cache /data /workspace/runs \
 && ln -s /cache /home/visionlab/.cache \
 && chown visionlab: /home/visionlab /cache /data /workspace /workspace/runs \
 && chmod 1777 /home/visionlab /cache /data /workspace/runs

WORKDIR /workspace
COPY pyproject.toml README.md requirements.txt ./
COPY lock lock
COPY scripts scripts
COPY configs configs
COPY benchmarks benchmarks
COPY callbacks callbacks
COPY datamodules datamodules
COPY app app
COPY modules modules
RUN pip install --no-deps --no-build-isolation --no-index -e .
USER visionlab
ENTRYPOINT ["visionlab"]
CMD ["--help"]
