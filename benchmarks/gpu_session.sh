#!/usr/bin/env bash
# One GPU session, as one prepared script: imports, the test suite on CUDA, then every benchmark
# with --device cuda (the demo first: the others measure its final checkpoint; the longest last). Each stage has its
# own time limit so one slow stage cannot starve the rest; everything is logged to $OUT/gpu.log.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_session.sh
#   OUT=/tmp/gpu STAGES="setup tests" bash benchmarks/gpu_session.sh   # some stages only
#
# All stages at their limits take ~13 min, more than one 10-minute device call: split them, e.g.
#   STAGES="setup cuda_tests tests"   then
#   STAGES="setup demo_wall sampler_vs_plain train_vs_plain cuda_vs_cpu run_vs_naive"
# (on one H100 the second took ~5 min: demo 3 min, the rest under 30 s each, run_vs_naive longer).
#
# The tests stage needs pytest-xdist and pytest-timeout (both in the GPU image); a killed stage
# leaves no worker behind. NAIVE_PROBLEMS (default 4) sizes run_vs_naive's naive script.
# Missing packages (transformer-lens, nnsight and what they import) are installed from .whl/ when
# that folder exists (see the device notes in README's "GPU" section).
set -u
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
LOG=$OUT/gpu.log
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$LOG" 2>&1 || { echo "wheel install failed" | tee -a "$LOG"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi

STAGES=${STAGES:-setup cuda_tests tests demo_wall run_vs_naive sampler_vs_plain train_vs_plain cuda_vs_cpu}
stage() {  # stage NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  echo "=== $name (limit ${limit}s) $(date +%T)" | tee -a "$LOG"
  local t0=$(date +%s)
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  pkill -9 -f "pytest|benchmarks/[a-z_]+[.]py" 2>/dev/null
  echo "=== $name: exit $rc after $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
  tail -n 3 "$LOG" | head -n 2
}

stage setup 40 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; python3 -c "
import sys, torch, transformers, transformer_lens, nnsight, sklearn, pandas
from nnsight.modeling.transformers import TransformersModel
import probes.api, hooks.native, hooks.hf, analysis.figures, probes.grid
print(sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0))
print(\"transformers\", transformers.__version__, \"transformer_lens\", transformer_lens.__version__ if hasattr(transformer_lens, \"__version__\") else \"?\", \"nnsight\", nnsight.__version__, \"pandas\", pandas.__version__)
"'
# The CUDA-specific files first, alone and with whole tracebacks: a later stage's time limit must
# not cost their diagnosis (it did once). Then the whole suite, one torch thread per worker.
stage cuda_tests ${CUDA_TESTS_LIMIT:-120} python3 -m pytest -v --tb=long -rfE -p no:randomly -p no:benchmark \
  tests/test_cuda.py tests/test_hf.py tests/test_sampler.py
stage tests ${TESTS_LIMIT:-150} env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python3 -m pytest -v --tb=short -rfE \
  --durations=12 -n 16 --timeout 120 -p no:randomly -p no:benchmark --ignore=tests/test_notebook.py
stage demo_wall 200 python3 benchmarks/demo_wall.py --device cuda --out runs/demo --no-growth
stage sampler_vs_plain 40 python3 benchmarks/sampler_vs_plain.py --device cuda
stage train_vs_plain 40 python3 benchmarks/train_vs_plain.py --device cuda
stage cuda_vs_cpu 40 python3 benchmarks/cuda_vs_cpu.py
stage run_vs_naive ${RVN_LIMIT:-150} python3 benchmarks/run_vs_naive.py --device cuda --naive-problems ${NAIVE_PROBLEMS:-4}
for f in report.md results.csv manifest.json; do
  [ -f runs/demo/results/$f ] && cp runs/demo/results/$f "$OUT/demo-$f"
done
grep -E "^[a-z_]+: ratio" "$LOG" | tee "$OUT/ratios.txt"
