#!/usr/bin/env bash
# Every GPU check of kvframe in one go, for a machine with an NVIDIA GPU and cupy (the workplace's
# device machine: CUDA 13, cupy-cuda13x and nvidia-nccl-cu13 preinstalled, no network).
#
#   bash benchmarks/gpu_check.sh fetch   # HERE, with network: download the wheels the GPU machine
#                                        # lacks into .whl/ (git-ignored through .git/info/exclude)
#   bash benchmarks/gpu_check.sh         # THERE: install kvframe's packages (no network, no deps),
#                                        # run `pytest -m gpu` and benchmarks/bench_nccl.py
#
# On the device machine, as one call:  run(command="bash benchmarks/gpu_check.sh", carry=[".whl"],
# timeout_s=540). Logs and the benchmark's JSON go to $OUT (or bench-results/gpu-check/).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${1:-}" = "fetch" ]; then
    # What the GPU image lacks (see /work/.library/device/KINDS.md): pydantic and its parts; pyzmq so
    # that tests/dist collects. The versions match this checkout's virtual environment when it has one.
    VENV_PY=.venv/bin/python
    [ -x "$VENV_PY" ] || VENV_PY=$PY
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    mkdir -p .whl
    pins=$("$VENV_PY" - <<'EOF'
from importlib import metadata
for name in ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "pyzmq"):
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(name)
EOF
)
    # shellcheck disable=SC2086
    "$VENV_PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $pins || exit 1
    ls -la .whl
    exit 0
fi

OUT=${OUT:-bench-results/gpu-check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
echo "== $(date -u) on $(hostname)"
nvidia-smi -L 2>/dev/null || echo "(nvidia-smi not found)"

SITE=/tmp/kvframe-site
rm -rf "$SITE"
if ls .whl/*.whl >/dev/null 2>&1; then
    echo "== installing carried wheels: $(ls .whl | tr '\n' ' ')"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || { echo "carried wheels failed to install"; exit 1; }
fi
echo "== installing kvframe's packages from this checkout (no deps, no network)"
pkgs=(. ./backends/*/ ./compressors ./optimizers ./tests/plugins)
$PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${pkgs[@]}" || { echo "installing kvframe failed"; exit 1; }
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

$PY - <<'EOF'
import cupy
from cupy.cuda import nccl
print("cupy", cupy.__version__, "GPUs", cupy.cuda.runtime.getDeviceCount(), "NCCL available", nccl.available,
      nccl.get_version() if nccl.available else "")
import kvframe
from kvframe import plugins
print("stores:", plugins.names("stores"))
EOF

echo "== pytest -m gpu"
timeout 420 $PY -m pytest -m gpu -q -rs -p no:cacheprovider --continue-on-collection-errors tests \
    --junitxml "$OUT/pytest-gpu.xml"
rc_tests=$?
echo "== pytest exit status: $rc_tests"

echo "== benchmarks/bench_nccl.py"
timeout 240 $PY benchmarks/bench_nccl.py --json "$OUT/bench_nccl.json"
rc_bench=$?
echo "== bench exit status: $rc_bench"
[ "$rc_tests" -eq 0 ] && [ "$rc_bench" -eq 0 ]
