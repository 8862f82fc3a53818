#!/usr/bin/env bash
# The GPU checks, in one short run (~3 min of steps on one H100 or H200): the fast sampler's CUDA tests
# (equivalence to the reference with side streams, traces and CUDA graphs), per-chunk latency of every method at
# the paper size (target: Jacobi DAP under 50 ms at K = 10, batch 1), DAP and FM with TF32 matmuls (speed, and
# how far the actions move) and without CUDA graphs (before/after), the small config, and training throughput at
# the paper size.
#
#   bash benchmarks/paper/gpu_check.sh OUT_DIR        (from the repository root; PYTHON=... to pick python)
#
# Needs a CUDA device, torch and numpy (and pytest for the tests); the package runs from src/ uninstalled.
# Every step has its own time limit, so one slow step costs its limit, never the rest. ONLY="name name ..." runs
# just those steps (e.g. ONLY="machine cuda_tests gated_vs_joint_paper" when a loan is short).
set -u
out=${1:-runs/gpu_check}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log="$out/gpu_check.log"
: >"$log"

step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
    echo "== $name ($(date -u +%T), limit ${limit}s): $*" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    echo "== $name rc=${PIPESTATUS[0]}" | tee -a "$log"
}

bench="$py -m dapolicy bench"
step machine 30 bash -c "nvidia-smi -L; $py -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))'"
step cuda_tests 120 $py -m pytest -q -p no:cacheprovider tests/policies/test_fast_sampler.py -k cuda
# every method, the default sampler (DAP and FM replay CUDA graphs from their second call)
step latency_paper 300 $bench latency --config paper --device cuda --steps 1,10 --batch 1,8 --reps 15 \
    --out "$out/latency_paper.json"
# DAP's gated next-observation attention (the default) against the joint one (the default before) and FM
step gated_vs_joint_paper 90 $py benchmarks/latency/gated_vs_joint.py --config paper --device cuda --batch 1,8 \
    --reps 30 --out "$out/gated_vs_joint_paper.json"
# TF32 matmuls with graphs (an opt-in setting: not bit-equal to fp32, so never the default)
step latency_paper_tf32 60 $bench latency --config paper --device cuda --steps 10 --batch 1,8 --methods dap,fm \
    --matmul-precision high --out "$out/latency_paper_tf32.json"
# what TF32 does to the sampled actions (same observation and noise, fp32 against TF32)
step tf32_actions 60 $py benchmarks/paper/tf32_actions.py --config paper --device cuda --out "$out/tf32_actions.json"
# before/after: DAP and FM without CUDA graphs (eager kernel launches)
step latency_paper_eager 60 $bench latency --config paper --device cuda --steps 10 --batch 1,8 --methods dap,fm \
    --sampler cuda_graph=off --out "$out/latency_paper_eager.json"
step latency_small 45 $bench latency --config small --device cuda --steps 10 --batch 1,8 --methods dap,fm \
    --out "$out/latency_small.json"
step train_paper 45 $bench train --config paper --device cuda --reps 3 --out "$out/train_paper.json"
