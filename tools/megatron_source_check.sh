#!/usr/bin/env bash
# Run the plugin's CPU tests against a Megatron-LM source tree instead of the installed
# megatron-core (issue 34; results go to docs/megatron_versions.md).
#
#   tools/megatron_source_check.sh SOURCE [SUBSET... | -- PYTEST_ARGS...]
#
# SOURCE   a Megatron-LM checkout (the directory holding megatron/core), or GIT_DIR@REF: a git
#          directory (bare or a checkout's .git) and a branch, tag or commit in it
# SUBSET   routers | dispatcher | layer | pretrain | checkpoints (any of them; default: all
#          five), or suite (every CPU test); after --, pytest's own arguments instead
#
# megatron/core and megatron/training are exported to $MEGATRON_CHECK_DIR (default
# ${TMPDIR:-/tmp}/megatron-source-check/<name>), never into the tree or the virtual
# environment; the dataset helpers extension is copied from the installed megatron-core when
# the export has none (helpers.cpp has not changed from 0.19.2 to main and dev). The export
# goes first on PYTHONPATH, so it shadows the installed megatron-core in this process and in
# the simulated cluster's rank processes.
#
# Environment: PYTHON (default .venv/bin/python of this repository), MEGATRON_CHECK_DIR.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}

usage() {
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

[ $# -ge 1 ] || usage
SOURCE=$1
shift

TESTS=()
add_subset() {
    case $1 in
        routers)
            TESTS+=(tests/test_megatron_next.py tests/test_padding_mask.py
                tests/test_routers_unit.py tests/test_routers_cluster.py tests/test_zero_tokens.py)
            ;;
        dispatcher) TESTS+=(tests/test_dispatcher.py tests/test_traffic.py) ;;
        layer)
            TESTS+=(tests/test_layer.py tests/test_experts.py tests/test_spec.py
                tests/test_megatron_moe_cpu.py tests/test_gpt_cpu.py)
            ;;
        pretrain)
            TESTS+=(tests/test_adaptor.py tests/test_arguments.py tests/test_pretrain_virtual_cpu.py)
            ;;
        checkpoints) TESTS+=(tests/test_training_cpu.py tests/test_pipeline_cpu.py) ;;
        suite) TESTS+=(tests/) ;;
        *)
            echo "unknown subset '$1': use routers, dispatcher, layer, pretrain, checkpoints," \
                "suite, or -- and pytest's arguments" >&2
            exit 2
            ;;
    esac
}

if [ "${1:-}" = "--" ]; then
    shift
    TESTS=("$@")
else
    [ $# -gt 0 ] || set -- routers dispatcher layer pretrain checkpoints
    for subset in "$@"; do
        add_subset "$subset"
    done
fi
[ ${#TESTS[@]} -gt 0 ] || usage

# ---- export megatron/core and megatron/training -------------------------------------------
if [[ $SOURCE == *@* && ! -d $SOURCE ]]; then
    GIT_DIR_=${SOURCE%@*}
    REF=${SOURCE##*@}
    COMMIT=$(git --git-dir="$GIT_DIR_" rev-parse --verify "$REF^{commit}")
    NAME=${COMMIT:0:12}
else
    [ -d "$SOURCE/megatron/core" ] || {
        echo "$SOURCE has no megatron/core: give a Megatron-LM checkout or GIT_DIR@REF" >&2
        exit 2
    }
    COMMIT=$(git -C "$SOURCE" rev-parse HEAD 2>/dev/null || echo "not a git checkout")
    NAME=$(basename "$(cd "$SOURCE" && pwd)")
fi
DEST=${MEGATRON_CHECK_DIR:-${TMPDIR:-/tmp}/megatron-source-check/$NAME}
case $DEST in
    "$ROOT"/.venv | "$ROOT"/.venv/*)
        echo "MEGATRON_CHECK_DIR is inside the virtual environment: choose another place" >&2
        exit 2
        ;;
esac
rm -rf "$DEST/megatron"
mkdir -p "$DEST"
if [ -n "${REF:-}" ]; then
    git --git-dir="$GIT_DIR_" archive "$COMMIT" megatron/core megatron/training | tar -x -C "$DEST"
else
    mkdir -p "$DEST/megatron"
    cp -R "$SOURCE/megatron/core" "$SOURCE/megatron/training" "$DEST/megatron/"
fi

DATASETS=$DEST/megatron/core/datasets
if ! compgen -G "$DATASETS/helpers_cpp*.so" >/dev/null; then
    # the installed megatron-core's built extension, found without importing megatron.core
    INSTALLED=$("$PYTHON" -c 'import importlib.util as u
print(*u.find_spec("megatron").submodule_search_locations, sep="\n")')
    copied=
    while IFS= read -r location; do
        for so in "$location"/core/datasets/helpers_cpp*.so; do
            [ -f "$so" ] || continue
            cp "$so" "$DATASETS/"
            copied=$so
            break 2
        done
    done <<<"$INSTALLED"
    if [ -z "$copied" ]; then
        echo "no helpers_cpp extension in the installed megatron-core; build one with" \
            "make -C $DATASETS (pybind11 and a compiler)" >&2
        exit 1
    fi
    echo "dataset helpers: copied $copied"
fi

# ---- run ------------------------------------------------------------------------------------
export PYTHONPATH="$DEST:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
echo "Megatron-LM source: $SOURCE (commit $COMMIT) exported to $DEST"
"$PYTHON" -W ignore -c '
import megatron.core as core, megatron.training as training, megatron_locmoe as plugin
print("megatron.core", core.__version__, core.__file__)
print("megatron.training", training.__file__)
print("megatron_locmoe", plugin.__file__)' 2>&1 | grep -v -i warn
cd "$ROOT"
exec "$PYTHON" -m pytest -q -p no:cacheprovider --basetemp="$DEST/pytest" -W ignore "${TESTS[@]}"
