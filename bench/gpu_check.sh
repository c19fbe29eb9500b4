#!/usr/bin/env bash
# The GPU check on the GPU machine, from the repository root, with .gpu/ carried (bench/gpu_wheels.sh
# made it): installs Ray, faiss and imgsim from .gpu/ into a folder on PYTHONPATH (the machine's own
# torch, numpy, pyarrow ... stay), puts Fashion-MNIST where `imgsim dataset` looks, checks the
# imports, then runs `bench/gpu_check.py --device cuda` under a time limit. The report
# (gpu_check.json), the logs and the GPU samples land in $OUT.
#
#   bash bench/gpu_check.sh [bench/gpu_check.py arguments, e.g. --arch NAME --stages train_gpu,eval]
#
# Environment: OUT (default ./gpu-check-out), PYTHON (default python3), GPU_DIR (what was carried,
# default .gpu), IMGSIM_SITE (default imgsim-site in $TMPDIR), GPU_CHECK_SECONDS (hard limit for the
# check, default 560). Arguments come after this script's own `--device cuda --time-limit`, so they
# win: `--device cpu --quick` rehearses the whole thing on a machine without a GPU.
set -uo pipefail

# All in one function: bash reads a script as it runs, so an edit to this file during a run would
# otherwise change what the rest of the run executes.
main() {
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SITE=${IMGSIM_SITE:-${TMPDIR:-/tmp}/imgsim-site}
RAY_TMP=${RAY_TMPDIR:-/tmp}/ray  # where Ray keeps its sessions
LIMIT=${GPU_CHECK_SECONDS:-560}
GPU_DIR=${GPU_DIR:-.gpu}
exec > >(tee -a "$OUT/install.log") 2>&1
step() { echo "[gpu_check.sh $(date +%T)] $*"; }
started=$(date +%s)

PYV=$($PY -c 'import sys; print("%d.%d" % sys.version_info[:2])')
SITE_TAR=$GPU_DIR/site-py$PYV.tar.xz
if [ ! -f "$SITE_TAR" ]; then
  step "no $SITE_TAR: run 'bench/gpu_wheels.sh --python $PYV' in this checkout and carry $GPU_DIR"
  return 2
fi

step "unpacking $SITE_TAR into $SITE"
rm -rf "$SITE"
$PY - "$SITE_TAR" "$SITE" <<'EOF' || return 3
import sys, tarfile, time
t = time.time()
with tarfile.open(sys.argv[1], "r:xz") as tf:
    if hasattr(tarfile, "data_filter"):
        tf.extractall(sys.argv[2], filter="data")
    else:
        tf.extractall(sys.argv[2])
print(f"unpacked in {time.time() - t:.1f} s")
EOF
head -1 "$SITE/GPU_CHECK_SITE.txt"

# imgsim: its wheel when it was built from exactly this tree's sources, else the tree itself
tree_hash=$($PY bench/gpu_check.py --source-hash)
wheel=$(ls "$GPU_DIR"/imgsim-*.whl 2>/dev/null | head -1)
if [ -n "$wheel" ] && [ "$(cat "$GPU_DIR"/imgsim-source.sha256 2>/dev/null)" = "$tree_hash" ]; then
  step "installing $wheel"
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$wheel" || return 3
  export PYTHONPATH=$SITE
  export IMGSIM_WHEEL_SOURCE_HASH=$tree_hash
else
  step "no imgsim wheel built from this tree's sources (rerun bench/gpu_wheels.sh): imgsim runs from the tree"
  export PYTHONPATH=$SITE:$PWD
fi

# Byte-compile the unpacked tree once (all cores): otherwise the first `ray.init` compiles Ray's
# modules in the driver and in each agent at once, and the raylet gives its agents 15 s to start
# (on the loaded 2-core rehearsal machine it gave up: "Check failed" in node_manager.cc).
step "byte-compiling $SITE"
$PY -m compileall -q -j 0 "$SITE" >/dev/null 2>&1 || true

# Fashion-MNIST: the carried .xz files, as the .gz files `imgsim dataset` looks for in its cache
if [ -d "$GPU_DIR"/fashion-mnist ]; then
  cache=${XDG_CACHE_HOME:-$HOME/.cache}/imgsim/fashion-mnist
  step "Fashion-MNIST into $cache"
  $PY - "$GPU_DIR"/fashion-mnist "$cache" <<'EOF' || return 3
import gzip, lzma, os, shutil, sys, time
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
t = time.time()
for f in sorted(src.glob("*.xz")):
    target, part = dst / (f.stem + ".gz"), dst / (f.stem + ".gz.part")
    with lzma.open(f) as i, gzip.open(part, "wb", compresslevel=1) as o:
        shutil.copyfileobj(i, o, 1 << 20)
    os.replace(part, target)
print(f"{len(list(dst.glob('*.gz')))} files in {time.time() - t:.1f} s")
EOF
fi

step "checking the imports"
# (from / so that the current directory does not put the tree's imgsim first)
(cd / && $PY -) <<'EOF' || { step "imports failed: see above"; return 4; }
import time
t = time.time()
import faiss, ray, ray.data, ray.train, ray.train.torch, torch
import imgsim, pipelines.train, pipelines.build_index
print(f"ray {ray.__version__}, faiss {faiss.__version__}, torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}, available {torch.cuda.is_available()}), imgsim from {imgsim.__file__}; "
      f"{time.time() - t:.1f} s")
EOF
if (cd / && $PY -c "import ray.serve, serve.app") >/dev/null 2>&1; then
  step "ray.serve and imgsim's Serve app import too"
else
  step "ray.serve or imgsim's Serve app does not import here (the check does not serve)"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

left=$((LIMIT - ($(date +%s) - started)))
step "running the check (hard limit $left s)"
timeout --signal=TERM --kill-after=20 "$left" $PY bench/gpu_check.py --device cuda --out "$OUT" \
  --time-limit $((left - 40)) "$@"
rc=$?
if [ "$rc" != 0 ] && [ -d "$RAY_TMP" ]; then
  # Ray's own logs of the last sessions, for a failure the report's error_tail does not explain
  tar -czf "$OUT/ray-logs.tgz" -C "$RAY_TMP" $(cd "$RAY_TMP" && ls -d session_2* 2>/dev/null | tail -3 | sed 's|$|/logs|') 2>/dev/null
  [ "$(stat -c %s "$OUT/ray-logs.tgz" 2>/dev/null || echo 0)" -lt $((15 * 1024 * 1024)) ] || rm -f "$OUT/ray-logs.tgz"
fi
step "exit $rc after $(($(date +%s) - started)) s; report in $OUT/gpu_check.json"
return $rc
}

main "$@"
exit $?
