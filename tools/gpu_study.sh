#!/usr/bin/env bash
# The study's runs (issue 32) on a lent GPU machine, several launcher runs sharing the card
# (docs/study.md, "On one GPU"). Every run is `python -m megatron_locmoe.launch --config PRESET
# --runs ARM --set seed=SEED`, so it trains exactly what the preset says; each is stopped by
# SIGTERM at a step boundary if the call's deadline comes first (its logs then end there).
#
#   here:   python -m megatron_locmoe.data.carry pack --data data/realtext --out .data_parts
#             (the whole corpus: 3 parts) and .whl/mcore (megatron-core 0.19.2 and the wheels of
#             pydantic and PyYAML, pip download --no-deps)
#   device, back to back (the machine's /tmp lasts while it is held):
#     run(carry=[".data_parts/carry.json", ".data_parts/realtext.part000"],
#         command="bash tools/gpu_study.sh stage")                      (and part001 alike)
#     run(carry=[".data_parts/carry.json", ".data_parts/realtext.part002", ".whl/mcore"],
#         command="bash tools/gpu_study.sh run study-gpu-8x8-control 'megatron:1 locmoe:1' 540")
#   later calls carry .whl/mcore alone; the corpus stays unpacked in /tmp/realtext.
#   In one call instead (a short lease): pack --sample 0.25 --out .data_parts/sample25 (one part,
#   ~45 MiB: a quarter of every domain's training documents, held-out sets whole) and
#     run(carry=[".data_parts/sample25", ".whl/mcore"],
#         command="PARTS=.data_parts/sample25 bash tools/gpu_study.sh run PRESET 'ARM:SEED ...'")
#   While the working tree has uncommitted edits, run a clean copy of the commit instead:
#   git archive HEAD | tar -x -C .gpu_tree (.gpu_tree/ in .git/info/exclude), carry ".gpu_tree"
#   too and run "bash .gpu_tree/tools/gpu_study.sh ..."; .data_parts and .whl stay where the call
#   starts (the repository root there).
#
# PROFILE_EVERY=K: every run of the call also writes its training routing as expert
# placement's profiles, K iterations each, to $WORK/seedS/PRESET/ARM/profile/ (docs/placement.md).
# run PRESET 'ARM:SEED ...' [DEADLINE_S]: the runs start together (an item OTHER/ARM:SEED runs
# preset OTHER's arm: presets whose runs are launch-bound and compute-bound share a card well);
# each one's launcher log, its Megatron log and TensorBoard events land in
# $WORK/seedSEED/PRESET/ (WORK=/tmp/study, kept while the
# machine is held); calls.jsonl names the runs of each call (they share the card); gpu.csv samples the card every 5 s; the call ends within DEADLINE_S seconds
# of its start (default 540) with all of $WORK, earlier calls' runs included, in $OUT/study.tgz
# (what comes back from $OUT is 8 files at most, 2 folders deep). Here:
#   mkdir -p runs/gpu && tar -xzf FILES_AT/study.tgz -C runs/gpu
#   python -m megatron_locmoe.analysis.study collect runs/gpu --setting gpu-8x8-control ...
set -euo pipefail
START=$SECONDS
MODE=${1:-}
TOP=$PWD
PARTS=${PARTS:-.data_parts}
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
case "$MODE" in
  stage)
    python3 -m megatron_locmoe.data.carry stage --parts "$TOP/$PARTS"
    exit 0 ;;
  run) ;;
  *) echo "gpu_study.sh: MODE is stage or run, not '$MODE'" >&2; exit 2 ;;
esac
PRESET=${2:?gpu_study.sh run PRESET 'ARM:SEED ...' [DEADLINE_S]}
RUNS=${3:?gpu_study.sh run PRESET 'ARM:SEED ...' [DEADLINE_S]}
DEADLINE=${4:-540}
OUT=${OUT:-/tmp/out}
WORK=${WORK:-/tmp/study}
mkdir -p "$OUT" "$WORK"
if [ ! -f /tmp/realtext/build.json ]; then
  if [ -f "$TOP/$PARTS/carry.json" ]; then
    python3 -m megatron_locmoe.data.carry stage --parts "$TOP/$PARTS"
  fi
  python3 -m megatron_locmoe.data.carry unpack | tail -3
fi
if [ ! -d /tmp/site/megatron ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$TOP"/.whl/mcore/*.whl
fi
export PYTHONPATH=/tmp/site:$REPO PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
mkdir -p data
ln -sfn /tmp/realtext data/realtext
python3 - > "$WORK/versions.json" <<'PY'
import json, torch
import megatron.core
carried = json.load(open("/tmp/realtext/carry.json"))
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
                  "megatron-core": megatron.core.__version__,
                  "card": torch.cuda.get_device_name(),
                  "corpus_sample": carried.get("sample")}))
PY
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 >> "$WORK/gpu.csv" &
SMI=$!
LEFT=$((DEADLINE - (SECONDS - START) - 15))
if [ "$LEFT" -lt 60 ]; then echo "gpu_study.sh: only ${LEFT} s left of ${DEADLINE}" >&2; exit 1; fi
# which runs share the card in this call: the records say so beside their speed
python3 -c 'import json, sys, time
print(json.dumps({"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "preset": sys.argv[1], "deadline_s": int(sys.argv[3]),
                  "runs": [r if "/" in r else sys.argv[1] + "/" + r for r in sys.argv[2].split()]}))' \
  "$PRESET" "$RUNS" "$DEADLINE" >> "$WORK/calls.jsonl"
declare -A PIDS
for rs in $RUNS; do
  preset=$PRESET
  case "$rs" in */*) preset=${rs%%/*} ;; esac
  arm=${rs#*/}
  arm=${arm%%:*}
  seed=${rs##*:}
  dir="$WORK/seed$seed"
  mkdir -p "$dir/$preset"
  profile=()
  if [ -n "${PROFILE_EVERY:-}" ]; then
    profile=(--set locmoe-routing-profile="$dir/$preset/$arm/profile"
             --set locmoe-routing-profile-interval="$PROFILE_EVERY")
  fi
  timeout -s TERM -k 20 "$LEFT" python3 -m megatron_locmoe.launch --config "$preset" \
    --runs "$arm" --set seed="$seed" --set data-cache-path="/tmp/dcache/$preset-$arm-$seed" \
    "${profile[@]}" --runs-dir "$dir" --no-check > "$dir/$preset/$arm.launch.log" 2>&1 &
  PIDS[$rs]=$!
done
for rs in "${!PIDS[@]}"; do
  rc=0
  wait "${PIDS[$rs]}" || rc=$?
  echo "$rs exit $rc"
done
kill "$SMI" 2>/dev/null || true
for log in "$WORK"/seed*/*.launch.log "$WORK"/seed*/*/*.launch.log; do
  [ -f "$log" ] || continue
  echo "== $log"
  grep -E "iteration +[0-9]+/" "$log" | tail -1 | cut -c1-400 || true
  grep -E "validation loss|error" "$log" | tail -3 | cut -c1-300 || true
done
tar -czf "$OUT/study.tgz" -C "$WORK" .
echo "call: $((SECONDS - START)) s; $OUT/study.tgz: $(du -h "$OUT/study.tgz" | cut -f1)"
