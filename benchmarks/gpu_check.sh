#!/usr/bin/env bash
# Every GPU check in one prepared run, for a lent GPU machine (see docs/architecture.md, "GPU").
#
#   bash benchmarks/gpu_check.sh            # logs to $OUT (the device tool's) or /tmp/gpu-check
#   STEPS="infer pytest" PYTEST_ARGS="tests/test_models.py" bash benchmarks/gpu_check.sh   # a re-run of some
#
# The machine has python3 with a CUDA build of torch but not medfusion's other dependencies and no
# package index: when PY lacks them and .whl/gsite.tar.xz exists (made here by benchmarks/gpu_site.sh: the same wheel
# versions as .venv, for CPython 3.12 x86-64, unzipped and tarred with xz to fit the 64 MiB a call
# carries) it is unpacked and put on PYTHONPATH, with any .whl/*.whl beside it. Each step has its own
# time limit, the most informative first. All steps took ≈ 8 min on an H200 (session 13): give the
# device call timeout_s ≈ 560, or name fewer STEPS.
set -u
PY=${PYTHON:-python3}  # e.g. PYTHON=.venv/bin/python on a machine of your own
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MEDFUSION_QUIET=1
if [ -f .whl/gsite.tar.xz ] && ! "$PY" -c "import monai, SimpleITK" 2>/dev/null; then
  mkdir -p /tmp/site && tar xJf .whl/gsite.tar.xz -C /tmp/site
  for w in .whl/*.whl; do [ -f "$w" ] && "$PY" -m zipfile -e "$w" /tmp/site; done
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
STEPS=${STEPS:-e2e infer train smoke pytest}
step() {  # step NAME SECONDS CMD...: run with a limit, log to $OUT/NAME.log, keep going on failure
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  echo "=== $name ($(date +%T), limit ${limit}s): $*" >>"$OUT/$name.log"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" >>"$OUT/$name.log"
  tail -n 25 "$OUT/$name.log"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc
  "$PY" -c "import torch, monai, SimpleITK as s; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'monai', monai.__version__, 'sitk', s.Version_VersionString())"
} 2>&1 | tee "$OUT/env.log"
step e2e 150 "$PY" -m medfusion.cli run sample_data/patients --out /tmp/run-cuda --device cuda
step e2e 60 "$PY" -m medfusion.cli evaluate --pred /tmp/run-cuda --labels sample_data/labels --bootstrap 200
step infer 150 "$PY" benchmarks/gpu_infer.py
step train 200 "$PY" benchmarks/gpu_train.py
step smoke 60 "$PY" benchmarks/gpu_smoke.py
# shellcheck disable=SC2086
step pytest 200 "$PY" -m pytest -q --maxfail=5 --timeout 300 -p no:cacheprovider ${PYTEST_ARGS:-}
