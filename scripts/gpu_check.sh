#!/usr/bin/env bash
# The GPU check in one command, a few minutes on one GPU:
#   1. the CUDA tests (tests/test_cuda.py: adapters, merge, export, mixed ranks; float32 and bf16 vs the CPU)
#   2. python bench.py --device cuda        (eager: see BENCH_FLAGS below)
#   3. python train_toy.py --device cuda    (its default methods; bf16 autocast, TF32, compile, char-gpu)
# Every result lands under $OUT (default out/gpu_check): env.json (the run record every script
# writes, mlora_scripts.provenance: command, commit, torch, CPU, date; then the device name, CUDA,
# cuDNN, driver), test_cuda.xml, bench_<device>.json, train_toy/results.json and plots,
# a log per step, and summary.json (each step's command, exit code and seconds).
#
#   scripts/gpu_check.sh                          # on a machine with one CUDA GPU
#   scripts/gpu_check.sh --quick --device cpu     # the same steps, small, on the CPU: a rehearsal
#
# Each step has its own time limit (LIMIT_TESTS, LIMIT_BENCH, LIMIT_TOY seconds; 540 s in all by
# default), so one slow step cannot eat the others, and the script goes on after a failure; its exit
# code is the number of steps that failed. It uses `python` from PATH (PYTHON=... to change it): on a
# GPU machine, the Python whose torch has CUDA.
set -uo pipefail
cd "$(dirname "$0")/.."

ARGS=("$@")   # as given, for the run record
quick=0
device=cuda
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --device)
            [ $# -ge 2 ] || { echo "error: --device needs a value (cpu or cuda)" >&2; exit 2; }
            device="$2"; shift ;;
        *) echo "error: unknown argument '$1' (expected --quick, --device cpu|cuda)" >&2; exit 2 ;;
    esac
    shift
done
case "$device" in cpu|cuda) ;; *) echo "error: --device must be cpu or cuda, got '$device'" >&2; exit 2 ;; esac

PY=${PYTHON:-python}
OUT=${OUT:-out/gpu_check}
TOY_DIR=${TOY_DIR:-out/gpu_check_train_toy}   # checkpoints stay here; only results and plots go to $OUT
LIMIT_TESTS=${LIMIT_TESTS:-90}
LIMIT_BENCH=${LIMIT_BENCH:-180}
LIMIT_TOY=${LIMIT_TOY:-270}
# torch.compile of bench.py's 14 models would take minutes the GPU budget does not have, and would
# time the compiler's fusions rather than the methods; train_toy.py runs the compile path.
BENCH_FLAGS=${BENCH_FLAGS:---compile off}
QUICK_FLAG=""
[ "$quick" = 1 ] && QUICK_FLAG="--quick"
mkdir -p "$OUT" "$TOY_DIR"
if [ "$device" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "error: --device cuda but $PY's torch sees no CUDA GPU (use --device cpu for the rehearsal)" >&2
    exit 2
fi

# ${ARGS[@]+...}: an empty array is an unset variable to `set -u` in bash before 4.4
"$PY" - "$OUT/env.json" "$device" ${ARGS[@]+"${ARGS[@]}"} <<'EOF'
import json, os, platform, shlex, subprocess, sys
sys.path.insert(0, os.getcwd())   # the repository root (the script cd's there)
import torch
import mlora_scripts
path, device, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
record = mlora_scripts.provenance("scripts/gpu_check.sh", argv)
record["command"] = shlex.join(["scripts/gpu_check.sh", *argv])   # a bash script, not run by python
env = dict(provenance=record, cuda=torch.version.cuda, platform=platform.platform(), requested_device=device)
if device == "cuda":
    env.update(device=torch.cuda.get_device_name(0), cudnn=torch.backends.cudnn.version(),
               capability=".".join(map(str, torch.cuda.get_device_capability(0))),
               memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1),
               bf16=torch.cuda.is_bf16_supported(), gpus=torch.cuda.device_count(),
               nvidia_smi=run("nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"))
else:
    env.update(device="cpu")
mlora_scripts.write_json(path, env)
print(json.dumps(env, indent=1))
EOF

steps=()
failed=0
step() {   # step NAME LIMIT COMMAND...: run it under its time limit, its output into $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    tail -n 25 "$OUT/$name.log"
    [ "$rc" = 124 ] && echo "=== $name: stopped at its ${limit}s limit"
    [ "$rc" = 0 ] || failed=$((failed + 1))
    echo "=== $name: exit $rc after $((SECONDS - t0))s"
    steps+=("$name|$rc|$((SECONDS - t0))|$*")
}

step test_cuda "$LIMIT_TESTS" "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py --junitxml "$OUT/test_cuda.xml"
# shellcheck disable=SC2086  # the flags are meant to split
step bench "$LIMIT_BENCH" "$PY" bench.py --device "$device" $QUICK_FLAG $BENCH_FLAGS --out "$OUT/bench_$device.json"
# shellcheck disable=SC2086
step train_toy "$LIMIT_TOY" "$PY" train_toy.py --device "$device" $QUICK_FLAG --out_dir "$TOY_DIR"
mkdir -p "$OUT/train_toy"
find "$TOY_DIR" -maxdepth 1 \( -name '*.json' -o -name '*.png' \) -exec cp {} "$OUT/train_toy/" \;

printf '%s\n' "${steps[@]}" | "$PY" -c '
import json, sys
steps = [dict(zip(("name", "exit_code", "seconds", "command"), line.rstrip("\n").split("|", 3)))
         for line in sys.stdin if line.strip()]
for s in steps:
    s["exit_code"], s["seconds"] = int(s["exit_code"]), int(s["seconds"])
    s["timed_out"] = s["exit_code"] in (124, 137)
json.dump(dict(steps=steps, failed=sum(s["exit_code"] != 0 for s in steps)), open(sys.argv[1], "w"), indent=1)
' "$OUT/summary.json"
echo "=== done in ${SECONDS}s: $failed step(s) failed; results in $OUT"
exit "$failed"
