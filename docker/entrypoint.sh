#!/usr/bin/env bash
# The image's entrypoint: `docker run ... IMAGE PRESET [LAUNCHER ARGS...]` runs a preset
# (default: router-sweep) through the launcher; any other first word runs as a command
# (`docker run -it IMAGE bash`). LOCMOE_ENTRY (set by the Dockerfile) is the training entry,
# e.g. Megatron-LM's patched pretrain_gpt.py; LOCMOE_LAUNCH replaces the launcher command
# (the Ascend image sets launch/ascend.sh).
set -euo pipefail
cd "${LOCMOE_HOME:-/workspace/megatron-locmoe}"

preset=${1:-router-sweep}
if [[ -f "configs/${preset}.yaml" ]]; then
  [[ $# -gt 0 ]] && shift
  read -r -a launch_cmd <<< "${LOCMOE_LAUNCH:-python -m megatron_locmoe.launch}"
  entry=()
  if [[ -n "${LOCMOE_ENTRY:-}" ]]; then
    entry=(--entry "$LOCMOE_ENTRY")
  fi
  exec "${launch_cmd[@]}" --config "configs/${preset}.yaml" "${entry[@]}" "$@"
fi
exec "$@"
