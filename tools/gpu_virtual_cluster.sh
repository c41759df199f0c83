#!/usr/bin/env bash
# The virtual cluster's throughput run on a lent GPU machine, in one device call, without TE
# (docs/virtual_cluster.md, "On one GPU"). Run from a clean copy of a tested commit:
#
#   here:   rm -rf .gpu_tree && mkdir .gpu_tree && git archive HEAD | tar -x -C .gpu_tree
#           (.gpu_tree/ in .git/info/exclude); .data_parts/gpu4 from
#           python -m megatron_locmoe.data.carry pack --data data/realtext --out .data_parts/gpu4 \
#               --datasets en_reference en_techdocs en_literature zh_modern
#           and .whl/mcore (megatron-core 0.19.2 + pydantic's wheels, pip download --no-deps)
#   device: run(command="bash .gpu_tree/tools/gpu_virtual_cluster.sh [MODE]",
#               carry=[".gpu_tree", ".data_parts/gpu4", ".whl/mcore"])
#
# MODE: measure (default: plain vs virtual 16x8 with identical routing, mu 0: MFU and the
# virtual cluster's cost), quick (the same at micro-batch 2 and 4 steps, ~3 min: for a lease
# with little device time left), profile (where a step's time goes, 2x8), method (the virtual arm
# with LocMoE's default locality loss). Results and logs land in $OUT.
set -euo pipefail
MODE=${1:-measure}
case "$MODE" in
  measure | quick | profile | method) ;;
  *) echo "gpu_virtual_cluster.sh: MODE is measure, quick, profile or method, not $MODE" >&2; exit 2 ;;
esac
REPO=$(cd "$(dirname "$0")/.." && pwd)
TOP=$(cd "$REPO/.." && pwd)
cd "$REPO"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$TOP"/.whl/mcore/*.whl
export PYTHONPATH=/tmp/site:$REPO
if [ ! -f /tmp/realtext4/zh_modern.idx ]; then
  python3 -m megatron_locmoe.data.carry stage --parts "$TOP/.data_parts/gpu4" --stage /tmp/stage4 >/dev/null
  python3 -m megatron_locmoe.data.carry unpack --stage /tmp/stage4 --out /tmp/realtext4 | tail -2
fi
D="--data-path /tmp/realtext4/en_reference /tmp/realtext4/en_techdocs /tmp/realtext4/en_literature"
D="$D /tmp/realtext4/zh_modern --split 100,0,0 --tokenizer-type NullTokenizer --vocab-size 32768"
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
case "$MODE" in
  measure)
    timeout 420 python3 benchmarks/virtual_cluster.py --impl local --data "$D" \
      --extra "--locmoe-locality-loss-coeff 0" --micro-batch-size 8 --steps 5 --rounds 1 \
      --out "$OUT/virtual_local_sdpa_mu0.json" --logs "$OUT/logs" ;;
  quick)
    timeout 230 python3 benchmarks/virtual_cluster.py --impl local --data "$D" \
      --extra "--locmoe-locality-loss-coeff 0" --micro-batch-size 2 --steps 4 --rounds 1 \
      --out "$OUT/virtual_local_sdpa_mu0_mbs2.json" --logs "$OUT/logs" ;;
  profile)
    timeout 200 python3 benchmarks/virtual_cluster.py --impl local --data "$D" --cluster 2x8 \
      --ep-size 16 --arms plain --micro-batch-size 8 --steps 5 --rounds 1 --profile /tmp/prof \
      --out "$OUT/profile_local_sdpa.json" --logs "$OUT/logs_prof" ;;
  method)
    timeout 300 python3 benchmarks/virtual_cluster.py --impl local --data "$D" --arms virtual \
      --micro-batch-size 8 --steps 5 --rounds 1 --out "$OUT/virtual_local_sdpa_method.json" \
      --logs "$OUT/logs_method" ;;
esac
nvidia-smi --query-gpu=name,memory.used --format=csv
