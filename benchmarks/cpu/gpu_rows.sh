#!/usr/bin/env bash
# Some rows of the `cpu` suite trained and evaluated on one lent GPU, all (row, seed) runs at once, within a
# deadline: for the rows too slow for this CPU (PushT at 6,000 policy steps takes 37-42 min per run at one thread on a fast VM).
#
#   ROWS="dap-resnet-6k fm-resnet-6k dp-c-6k" TASK=pusht SEEDS="0 1 2" DATA=path/to/data/pusht \
#       DEADLINE=480 bash benchmarks/cpu/gpu_rows.sh OUT_DIR
#
# From the repository root, with torch, numpy and the task's simulator importable (the package runs from src/
# uninstalled). DATA (optional) is the task's collected data folder, so the GPU machine does not collect it again;
# the collection is seeded, so it is the same data either way. Rows with `init_from` train their source row (the
# shared `base` run) first. Same recipe, seeds and test episodes as on the CPU: the cells record
# `train_device` and `eval_device`, so a reader sees which ones a GPU made (their success is comparable with
# the CPU's cells, their training times and latencies are not). At the deadline every run still going is
# stopped; the finished cells, each run's state and the logs land in OUT_DIR/gpu_rows.tgz. Unpack that in the
# repository root and run `dap benchmark cpu --report`. SUITE, DEVICE and EVAL_DEVICE (default cpu, cuda, cuda)
# change the suite and devices (SUITE=smoke DEVICE=cpu EVAL_DEVICE=cpu tries the script on a CPU).
set -u
out=${1:?OUT_DIR}
work=${WORK:-/tmp/gpu_rows}
py=${PYTHON:-python3}
: "${ROWS:?ROWS}" "${TASK:?TASK}" "${SEEDS:?SEEDS}"
deadline=${DEADLINE:-480}
suite=${SUITE:-cpu}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 SDL_VIDEODRIVER=dummy MUJOCO_GL=egl \
    PYTHONHASHSEED=0 OMP_NUM_THREADS=1
mkdir -p "$out" "$work/data" "$work/logs"
if [ -n "${DATA:-}" ] && [ ! -d "$work/data/$TASK" ]; then cp -r "$DATA" "$work/data/$TASK"; fi
start=$(date +%s)

bench() {  # bench LOG ARGS...: one benchmark process, stopped at the deadline
    local log=$1 left
    shift
    left=$((deadline - ($(date +%s) - start)))
    [ "$left" -gt 5 ] || { echo "deadline passed before: $*" >>"$log"; return 124; }
    echo "== $(date -u +%T) $*" >>"$log"
    timeout "$left" "$py" -m dapolicy benchmark "$suite" --work "$work" --tasks "$TASK" --device "${DEVICE:-cuda}" \
        --eval-device "${EVAL_DEVICE:-cuda}" --threads 1 --quiet "$@" >>"$log" 2>&1
    echo "== rc=$? $(date -u +%T)" >>"$log"
}

touch "$work/logs/started"
nvidia-smi -L >"$work/logs/machine.txt" 2>&1
"$py" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))' >>"$work/logs/machine.txt" 2>&1
# the data once, before any parallel run reads it
"$py" - "$suite" "$work" "$TASK" <<'EOF' >>"$work/logs/data.log" 2>&1
import sys
from pathlib import Path
from dapolicy.benchmark import Runner, load_suite
Runner(load_suite(sys.argv[1]), Path(sys.argv[2]), progress=False).ensure_data(sys.argv[3])
EOF
source_of() {  # the row whose run this row starts from (`init_from`), or nothing; an unknown row is an error
    "$py" -c 'import sys; from dapolicy.benchmark import load_suite
rows = load_suite(sys.argv[1]).variants
if sys.argv[2] not in rows:
    sys.exit(f"gpu_rows.sh: no row {sys.argv[2]!r} in suite {sys.argv[1]!r}")
print(rows[sys.argv[2]].init_from or "")' "$suite" "$1"
}
# rows without a source start at once; the others wait, per seed, for their source run (trained once, then
# every row that starts from it at once: two processes never train one run folder)
declare -A source=() waiting=()
for row in $ROWS; do
    source[$row]=$(source_of "$row") || exit 1
    [ -z "${source[$row]}" ] || waiting[${source[$row]}]="${waiting[${source[$row]}]:-} $row"
done
for row in $ROWS; do
    [ -z "${source[$row]}" ] && [ -z "${waiting[$row]:-}" ] || continue
    for seed in $SEEDS; do bench "$work/logs/${row}_s$seed.log" --only "$row" --seeds "$seed" & sleep 1; done
done
for src in "${!waiting[@]}"; do
    only_train=--train-only  # a source that is itself one of ROWS is evaluated too
    [[ " $ROWS " == *" $src "* ]] && only_train=
    for seed in $SEEDS; do
        (
            bench "$work/logs/${src}_s$seed.log" --only "$src" --seeds "$seed" $only_train
            for row in ${waiting[$src]}; do bench "$work/logs/${row}_s$seed.log" --only "$row" --seeds "$seed" & done
            wait
        ) &
        sleep 1
    done
done
wait
echo "elapsed $(($(date +%s) - start)) s" >>"$work/logs/machine.txt"
nvidia-smi >>"$work/logs/machine.txt" 2>&1
{ find "$work/runs" \( -name state.json -o -name benchmark_recipe.json -o -name metrics.jsonl -o -name config.json \)
  find "benchmarks/$suite/cells" -name '*.json' -newer "$work/logs/started"
  echo "$work/logs"; } 2>/dev/null | tar czf "$out/gpu_rows.tgz" -T -
ls -la "$out"
