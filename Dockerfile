# visionlab on a CUDA-enabled PyTorch base. Build:  docker build -t visionlab .
# Run:  docker run --gpus all --ipc=host -v $PWD/runs:/workspace/runs visionlab \
#         fit --config configs/trainer/gpu.yaml --config configs/data/fashion_mnist.yaml \
#             --config configs/classification/resnet18.yaml
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1

# Debian packages: FFCV build deps (pkg-config, libturbojpeg0-dev, libopencv-dev), a compiler for
# FFCV's C extension, and the embedded default dataset (dataset-fashion-mnist; in Debian 12, Ubuntu 24.04).
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential pkg-config libturbojpeg0-dev libopencv-dev dataset-fashion-mnist \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace
COPY requirements.txt pyproject.toml README.md ./
RUN python -m pip install -r requirements.txt
COPY app app
COPY modules modules
COPY datamodules datamodules
COPY callbacks callbacks
COPY configs configs
COPY benchmarks benchmarks
RUN python -m pip install --no-deps -e .

ENTRYPOINT ["visionlab"]
CMD ["--help"]
