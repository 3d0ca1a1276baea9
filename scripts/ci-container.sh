#!/usr/bin/env bash
# CI's container job: build the image with a real Docker engine and run visionlab in it as a cluster would.
#   bash scripts/ci-container.sh
# Installs Debian's docker.io and starts dockerd where none runs (and stops the one it started), builds the image
# with scripts/build-image.sh (base from debootstrap when no registry answers; layers cached by the engine), then,
# with --network none and runs/ + cache folders owned by a non-root uid that is not the image's own: the image's
# packages against the lock files, `fit` of every technique's debug.yaml (MAE before the linear probe that reads its
# checkpoint), `validate` of a checkpoint, store-logits, sample, prepare-data, and bad input (exit code 2, one line);
# then the image converted by charliecloud runs the two-node SLURM test jobs (CONTAINER_SLURM=0 leaves them out).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-visionlab}
RUN_UID=${RUN_UID:-4242}
started=""
work=$(mktemp -d /tmp/visionlab-ci-container.XXXXXX)
cleanup() {
  rm -rf --one-file-system "$work"
  if [ -n "$started" ]; then kill "$started" 2>/dev/null || true; fi
}
trap cleanup EXIT
step() { echo "ci-container: $* ($(date -u +%H:%M:%S))"; }

if ! command -v dockerd >/dev/null; then
  step "installing docker.io"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >/dev/null
fi
DOCKER=docker  # Debian's client has BuildKit built in; a newer CLI without buildx does not (see build-image.sh)
if ! $DOCKER buildx version >/dev/null 2>&1 && [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; fi
if ! $DOCKER info >/dev/null 2>&1; then
  step "starting dockerd"
  dockerd --storage-driver=overlay2 >"$work/dockerd.log" 2>&1 &
  started=$!
  for _ in $(seq 60); do $DOCKER info >/dev/null 2>&1 && break; sleep 1; done
  $DOCKER info >/dev/null 2>&1 || { cat "$work/dockerd.log"; exit 1; }
fi

step "building $IMAGE"
build_start=$(date +%s)
PROGRESS=${PROGRESS:-plain} IMAGE=$IMAGE bash scripts/build-image.sh >"$work/build.log" 2>&1 || { tail -n 60 "$work/build.log"; exit 1; }
step "built in $(( $(date +%s) - build_start )) s; $($DOCKER image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}')"

mkdir -p "$work/runs" "$work/cache" "$work/data"
chown -R "$RUN_UID:$RUN_UID" "$work/runs" "$work/cache" "$work/data"
vl() {  # vl ARGS...: one `visionlab ARGS` in a fresh container, as the non-root uid, without network
  $DOCKER run --rm --network none --ipc=host --user "$RUN_UID:$RUN_UID" \
    -v "$work/runs:/workspace/runs" -v "$work/cache:/cache" -v "$work/data:/data" "$@"
}

step "default user and installed packages"
[ "$($DOCKER run --rm --network none --entrypoint id "$IMAGE" -u)" = 1000 ]
check_lock='
import importlib.metadata as md, re, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
installed = {norm(d.metadata["Name"]): d.version for d in md.distributions()}
locked = dict(re.match(r"([^=]+)==(\S+)", line).groups() for name in ("torch", "runtime", "build")
              for line in open(f"lock/{name}.txt") if not line.startswith("#"))
extra = set(installed) - set(locked) - {"pip", "setuptools", "visionlab"}
wrong = {name: (version, installed.get(name)) for name, version in locked.items() if installed.get(name) != version}
print(f"{len(locked)} locked packages; differ (lock, installed): {wrong}; installed but not locked: {sorted(extra)}")
sys.exit(1 if wrong or extra else 0)'
vl --entrypoint python "$IMAGE" -c "$check_lock"

fit() { step "fit $1"; vl "$IMAGE" fit --config configs/trainer/debug.yaml --config configs/data/fashion_mnist.yaml \
  --config "configs/$1/debug.yaml" "${@:2}" >"$work/fit.log" 2>&1 || { tail -n 40 "$work/fit.log"; exit 1; }; }
for technique in classification mae linear_probe simmim mr_mae clip kd peft diffusion; do fit "$technique"; done

ckpt() { find "$work/runs/debug/$1" -name last.ckpt | head -n 1 | sed "s|^$work/runs|runs|"; }
classifier=$(ckpt classification); dit=$(ckpt diffusion)
[ -n "$classifier" ] && [ -n "$dit" ]
step "validate $classifier"
vl "$IMAGE" validate --config configs/trainer/debug.yaml --config configs/data/fashion_mnist.yaml \
  --config configs/classification/debug.yaml --ckpt_path "$classifier" 2>&1 | grep -E 'val/acc1'
step "store-logits"
vl "$IMAGE" store-logits --config configs/data/fashion_mnist.yaml --data.init_args.train_limit 128 \
  --data.init_args.val_limit 64 --teacher "$classifier" --epochs 2 --topk 3 --device cpu \
  --output runs/debug/kd/train_logits.vlsl | tail -n 1
step "sample"
vl "$IMAGE" sample --checkpoint "$dit" --per-class 1 --steps 2 --device cpu --out runs/debug/diffusion/samples | tail -n 1
[ "$(find "$work/runs/debug/diffusion/samples" -name '*.png' | wc -l)" = 10 ]
step "prepare-data"
vl "$IMAGE" prepare-data --config configs/data/fashion_mnist.yaml --data.init_args.train_limit 256 \
  --data.init_args.val_limit 128 --output /data/fashion_mnist --workers 2 | tail -n 1
[ -f "$work/data/fashion_mnist/train.beton" ] && [ -f "$work/data/fashion_mnist/manifest.json" ]

step "bad input"
set +e
vl "$IMAGE" sample --checkpoint runs/missing.ckpt --per-class 0 --out runs/x >"$work/bad.out" 2>"$work/bad.err"
code=$?
set -e
[ "$code" = 2 ] && [ "$(grep -c . "$work/bad.err")" = 1 ] && grep -q '^visionlab: error: ' "$work/bad.err" \
  || { echo "bad input: exit code $code, stderr:"; cat "$work/bad.err"; exit 1; }

step "file owners"
others=$(find "$work/runs" "$work/cache" "$work/data" ! -uid "$RUN_UID" | head -n 5)
[ -z "$others" ] || { echo "files not owned by uid $RUN_UID:"; echo "$others"; exit 1; }

# The same image the HPC way: converted by charliecloud and run unprivileged by every task of the project's
# two-node SLURM test jobs (training, and SIGUSR2 pre-emption + requeue from the batch script).
if [ "${CONTAINER_SLURM:-1}" = 1 ]; then
  if ! command -v ch-convert >/dev/null || ! command -v pigz >/dev/null; then
    step "installing charliecloud"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends charliecloud pigz >/dev/null
  fi
  step "ch-convert $IMAGE"
  ch-convert -i docker "$IMAGE" "$work/ch-image" >"$work/ch-convert.log" 2>&1 || { tail -n 20 "$work/ch-convert.log"; exit 1; }
  step "two-node SLURM jobs inside the image (ch-run)"
  VISIONLAB_TEST_CH_IMAGE="$work/ch-image" python3 -m pytest -q -n 0 -p no:cacheprovider tests/test_slurm.py -k charliecloud
fi
step "passed"
