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
# The hashed lock files (python3 scripts/lock.py makes them from requirements.txt / requirements-test.txt): the
# Docker image installs the same lock/torch.txt, runtime.txt and build.txt; test.txt adds the test tools.
# opencv-python (FFCV's declared dependency; the lock has opencv-python-headless, the same cv2 without Qt) and the
# headless wheel both own site-packages/cv2: an earlier opencv-python goes, with the cv2 files the two share.
if $PIP show opencv-python >/dev/null 2>&1; then $PIP uninstall -y -q opencv-python opencv-python-headless; fi
$PIP install -q --no-deps --require-hashes -r lock/torch.txt -r lock/runtime.txt -r lock/build.txt -r lock/test.txt
$PIP install -q --no-deps --no-build-isolation -e .
