#!/usr/bin/env bash
# Every GPU measurement and test the project asks for, in few device calls.
#
# Prepare once on the CPU machine:   ../shared/device/make-wheels.sh
# Then one device call per part (each fits the 10-minute limit), carrying [".whl"]:
#   bash benchmarks/gpu_session.sh tests       # pytest -m gpu (kernels, attention, toys on CUDA)
#   bash benchmarks/gpu_session.sh attention   # benchmarks/attention_jvp.py at S = 1536, 4608
#   bash benchmarks/gpu_session.sh flux        # benchmarks/flux_step.py on the FLUX slice, jvp_memory.py,
#                                              # meanflow_step.py (mfcore's and the peers' steps)
#   bash benchmarks/gpu_session.sh distributed # benchmarks/fsdp_overhead.py: FSDP2 at world size 1
#                                              # against the plain step on the FLUX slice (two
#                                              # builds of the slice, 2 x 6 steps)
#   bash benchmarks/gpu_session.sh all         # the four in a row (one 8-minute call)
# Logs, JSON results and the updated docs/benchmarks.md land in $OUT (the device tool's
# folder that comes back); copy the JSON and the docs page into the repository from there.
set -uo pipefail
part=${1:-all}
case $part in tests|attention|flux|distributed|all) ;;
  *) echo "unknown part '$part' (tests, attention, flux, distributed or all)" >&2; exit 2 ;; esac
out=${OUT:-$PWD/gpu-out}
mkdir -p "$out"

# diffusers, peft and jvp-flash-attention are not in the GPU image: install the carried
# wheels, and mfcore itself (its adapters/ and toys/ are mapped subpackages) next to them.
# The device keeps ignored folders between calls: start from an empty .site, never a stale copy.
rm -rf .site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target .site .whl/*.whl \
  || { echo "install the wheels first: ../shared/device/make-wheels.sh, carry .whl" >&2; exit 1; }
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target .site . || exit 1
export PYTHONPATH=$PWD/.site:$PWD

{ nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } \
  > "$out/device.txt" 2>&1

status=0
run() {  # run NAME CMD...: log to $out/NAME.log, keep going on failure, remember it
  local name=$1; shift
  echo "== $name: $*"
  "$@" > "$out/$name.log" 2>&1 || { status=1; echo "   failed (see $name.log)"; }
  tail -n 25 "$out/$name.log"
}

case $part in
  tests|all) run pytest_gpu python3 -m pytest -q -m gpu -p no:cacheprovider tests/ ;;&
  attention|all) run attention_jvp python3 benchmarks/attention_jvp.py ;;&
  flux|all) run flux_step python3 benchmarks/flux_step.py --reps 10
            run jvp_memory python3 benchmarks/jvp_memory.py --device cuda
            run meanflow_step python3 benchmarks/meanflow_step.py --device cuda --rounds 20
            run warmup_signals python3 benchmarks/warmup_signals.py --device cuda --steps 50 ;;&
  distributed|all) run fsdp_overhead python3 benchmarks/fsdp_overhead.py --reps 5 ;;&
esac

cp benchmarks/results/*.json docs/benchmarks.md "$out/" 2>/dev/null
exit $status
