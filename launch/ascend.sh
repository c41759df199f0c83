#!/usr/bin/env bash
# Ascend nodes: load CANN's environment, then run the launcher (same arguments).
#
#   launch/ascend.sh --config ascend-910b-2node --nodes 2 --node-rank R --master-addr NODE0
#
# CANN's set_env.sh puts the toolkit's libraries and tools on the paths that torch_npu needs at
# import; it is a shell script, so it is sourced here rather than from Python. The launcher then
# sets the HCCL variables and ASCEND_RT_VISIBLE_DEVICES, and every rank imports torch_npu before
# Megatron (python -m megatron_locmoe.launch --worker). Overrides: CANN_SET_ENV (default
# /usr/local/Ascend/ascend-toolkit/set_env.sh), LOCMOE_PYTHON (default python3).
set -euo pipefail

cann_set_env=${CANN_SET_ENV:-/usr/local/Ascend/ascend-toolkit/set_env.sh}
if [[ ! -f "$cann_set_env" ]]; then
  echo "ascend.sh: CANN not found at $cann_set_env; install the CANN toolkit or set CANN_SET_ENV" >&2
  exit 2
fi
# set_env.sh reads unset variables; relax -u while it runs.
set +u
# shellcheck source=/dev/null
source "$cann_set_env"
set -u
# ATB (nnal), when installed next to the toolkit: fused kernels some torch_npu ops use.
atb_set_env=${cann_set_env%/ascend-toolkit/*}/nnal/atb/set_env.sh
if [[ -f "$atb_set_env" ]]; then
  set +u
  # shellcheck source=/dev/null
  source "$atb_set_env"
  set -u
fi

exec "${LOCMOE_PYTHON:-python3}" -m megatron_locmoe.launch "$@"
