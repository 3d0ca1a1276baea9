# visionlab with CUDA PyTorch. Build:  docker build -t visionlab .
# Run:  docker run --gpus all --ipc=host -v $PWD/runs:/workspace/runs visionlab \
#         fit --config configs/trainer/gpu.yaml --config configs/data/fashion_mnist.yaml \
#             --config configs/classification/resnet18.yaml
#
# The image is set up by the same scripts/setup.sh as a bare machine, on the system it is written for
# (Debian 12, Python 3.11), so its Debian packages, torch/torchvision pins and pip requirements cannot drift
# from the tested ones. PyPI's Linux torch wheel carries its CUDA runtime; the host needs only the NVIDIA
# driver and the container toolkit (--gpus all).
FROM python:3.11-slim-bookworm

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1

# A compiler for FFCV's C extension (the slim image has none); scripts/setup.sh installs the rest.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace
COPY requirements.txt pyproject.toml README.md ./
COPY scripts scripts
COPY app app
COPY modules modules
COPY datamodules datamodules
COPY callbacks callbacks
COPY configs configs
COPY benchmarks benchmarks
RUN bash scripts/setup.sh && rm -rf /var/lib/apt/lists/*

ENTRYPOINT ["visionlab"]
CMD ["--help"]
