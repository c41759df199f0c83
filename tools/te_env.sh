#!/usr/bin/env bash
# Transformer Engine on a GPU machine that cannot reach the internet, from wheels carried in.
#
# Megatron users train with TE, but the GPU image has none and the core wheel
# (transformer-engine-cu13, ~276 MB) is larger than one transfer to that machine may be. The
# procedure, in steps that each fit one transfer:
#
#   here   tools/te_env.sh download   wheels + TE's torch sdist into .whl/te/, the core wheel cut
#                                      into .whl/te_parts/cu13.partNN (56 MiB each)
#   there  tools/te_env.sh stage      copy whatever part this call carried to $TE_STAGE (/tmp),
#                                      which outlives the call while the machine is held
#   there  tools/te_env.sh build-bg   build the torch extension (transformer_engine_torch) from
#                                      the sdist in the background (it needs no core library)
#   there  tools/te_env.sh install    join + check the core wheel, unpack everything into
#                                      $TE_SITE, wait for the build, import-check TE on the GPU
#   there  tools/te_env.sh export     the built extension wheel into $OUT in 15 MiB parts; copy
#                                      them to .whl/te_built/ here and later calls install it
#                                      instead of building (tools/te_env.sh install finds it)
#
# After install: export PYTHONPATH=$TE_SITE (tools/te_env.sh pythonpath prints it).
# Wheels stay out of git (.git/info/exclude: /.whl/).
set -euo pipefail

TE_VERSION=${TE_VERSION:-2.20.2}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WHL=${TE_WHL:-$ROOT/.whl}
TE_STAGE=${TE_STAGE:-/tmp/te_stage}
TE_SITE=${TE_SITE:-/tmp/site}
CORE=transformer_engine_cu13-$TE_VERSION-py3-none-manylinux_2_28_x86_64.whl
SDIST=transformer_engine_torch-$TE_VERSION.tar.gz
PART_SIZE=56M
# TE's Python side and Megatron-Core: small wheels, one transfer together.
SMALL=(
  "transformer-engine==$TE_VERSION" "megatron-core==0.19.2" "nvidia-cudnn-frontend==1.32.0"
  "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0"
  "typing-inspection==0.4.5" "importlib-metadata==10.2.0" "nvdlfw-inspect"
)

log() { echo "[te_env $(date +%H:%M:%S)] $*"; }
die() { echo "te_env: $*" >&2; exit 1; }

pip_download() {  # manylinux cp312 wheels, whatever the interpreter here
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$@"
}

pip_index() {  # the index pip is configured with (pip config, PIP_INDEX_URL), else pip's default
  local index
  index=${PIP_INDEX_URL:-$(python3 -m pip config get global.index-url 2>/dev/null || true)}
  [ -n "$index" ] || index=$(python3 -c 'from pip._internal.models.index import PyPI; print(PyPI.simple_url)')
  echo "${index%/}"
}

cmd_download() {
  mkdir -p "$WHL/te" "$WHL/te_parts"
  pip_download "$WHL/te" "${SMALL[@]}"
  if [ ! -f "$WHL/te/$SDIST" ]; then  # sdist only; pip download would try to build it here
    local index url
    index=$(pip_index)
    url=$(curl -fsS "$index/transformer-engine-torch/" |
      grep -o "https://[^\"#]*/$SDIST" | head -1)
    [ -n "$url" ] || die "no $SDIST on the package index"
    curl -fsS -o "$WHL/te/$SDIST" "$url"
  fi
  local tmp
  tmp=$(mktemp -d)
  pip_download "$tmp" "transformer-engine-cu13==$TE_VERSION"
  rm -f "$WHL"/te_parts/cu13.part*
  split -b "$PART_SIZE" -d "$tmp/$CORE" "$WHL/te_parts/cu13.part"
  (cd "$tmp" && sha256sum "$CORE") > "$WHL/te_parts/cu13.sha256"
  find "$WHL/te_parts" -maxdepth 1 -name 'cu13.part*' | wc -l > "$WHL/te_parts/cu13.count"
  rm -rf "$tmp"
  log "small wheels: $(du -sh "$WHL/te" | cut -f1); core in $(cat "$WHL/te_parts/cu13.count") parts:"
  ls -la "$WHL/te_parts"
  log "one device call per part: carry .whl/te_parts/cu13.partNN (+ .whl/te and the .sha256/.count files in the first)"
}

cmd_stage() {
  mkdir -p "$TE_STAGE"
  local f
  for f in "$WHL"/te/* "$WHL"/te_parts/* "$WHL"/te_built/*; do
    [ -f "$f" ] || continue
    [ -e "$TE_STAGE/$(basename "$f")" ] && continue
    cp "$f" "$TE_STAGE/" && log "staged $(basename "$f")"
  done
  local want have
  want=$(cat "$TE_STAGE/cu13.count" 2>/dev/null || echo '?')
  have=$(find "$TE_STAGE" -maxdepth 1 -name 'cu13.part*' | wc -l)
  if [ -f "$TE_STAGE/$CORE" ]; then log "core wheel joined"; else log "core parts staged: $have of $want"; fi
}

built_wheel() {  # the built extension wheel's path, or nothing (status 0 either way)
  local f
  for f in "$TE_STAGE"/transformer_engine_torch-"$TE_VERSION"-*.whl; do
    if [ -f "$f" ]; then echo "$f"; break; fi
  done
  true
}

cmd_build() {  # foreground build; build-bg runs this under setsid
  [ -f "$TE_STAGE/$SDIST" ] || die "$SDIST not staged (carry .whl/te in this call)"
  local site_fe="$TE_STAGE/build_site" src="$TE_STAGE/build_src"
  rm -rf "$site_fe" "$src" && mkdir -p "$site_fe" "$src"
  python3 -m pip install -q --no-index --no-deps --target "$site_fe" \
    "$TE_STAGE"/nvidia_cudnn_frontend-*.whl "$TE_STAGE"/pydantic*.whl
  tar -xzf "$TE_STAGE/$SDIST" -C "$src"
  local dir="$src/transformer_engine_torch-$TE_VERSION"
  # cuDNN's and the CUDA libraries' headers from their pip packages (the extension includes
  # cudnn.h, which no CUDA toolkit ships), after the toolkit's own
  local headers
  headers=$(python3 - <<'PY'
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit
dirs = [d for root in nvidia.__path__ for d in sorted(glob.glob(os.path.join(root, "*", "include")))]
dirs += [d for root in nvidia.__path__ for d in glob.glob(os.path.join(root, "cu13", "include"))]
print(":".join(dirs))
PY
)
  log "extra include path: ${headers:-none}"
  local start=$SECONDS
  log "building transformer_engine_torch $TE_VERSION (NVTE_CUDA_ARCHS=${NVTE_CUDA_ARCHS:-90})"
  (
    cd "$dir"
    # NVTE_PYTORCH_FORCE_BUILD: skip setup.py's download of a prebuilt wheel (no internet).
    # NVTE_WITH_NCCL_EP=0: the sdist carries no NCCL-EP headers; MoE dispatch here is Megatron's.
    CPATH="${headers}${CPATH:+:$CPATH}" PYTHONPATH="$site_fe${PYTHONPATH:+:$PYTHONPATH}" \
      NVTE_FRAMEWORK=pytorch \
      NVTE_CUDA_ARCHS=${NVTE_CUDA_ARCHS:-90} NVTE_PYTORCH_FORCE_BUILD=TRUE NVTE_WITH_NCCL_EP=0 \
      MAX_JOBS=${MAX_JOBS:-$(nproc)} \
      python3 -m pip wheel --no-build-isolation --no-deps --no-index -w "$TE_STAGE" .
  )
  local whl
  whl=$(built_wheel)
  [ -n "$whl" ] || die "build produced no wheel"
  echo $((SECONDS - start)) > "$TE_STAGE/build.seconds"
  log "built $(basename "$whl") ($(du -h "$whl" | cut -f1)) in $((SECONDS - start)) s"
}

cmd_build_bg() {
  if [ -n "$(built_wheel)" ]; then log "built wheel present: $(basename "$(built_wheel)")"; return; fi
  if [ -f "$TE_STAGE/build.pid" ] && kill -0 "$(cat "$TE_STAGE/build.pid")" 2>/dev/null; then
    log "build running (pid $(cat "$TE_STAGE/build.pid"))"; return
  fi
  rm -f "$TE_STAGE/build.rc"
  setsid bash -c "bash '$0' build > '$TE_STAGE/build.log' 2>&1; echo \$? > '$TE_STAGE/build.rc'" \
    < /dev/null > /dev/null 2>&1 &
  echo $! > "$TE_STAGE/build.pid"
  log "build started in the background (log: $TE_STAGE/build.log)"
}

cmd_wait_build() {
  local limit=${1:-480} t=0
  while [ -z "$(built_wheel)" ] && [ ! -f "$TE_STAGE/build.rc" ] && [ $t -lt "$limit" ]; do
    sleep 5; t=$((t + 5))
  done
  if [ -z "$(built_wheel)" ]; then
    tail -40 "$TE_STAGE/build.log" 2>/dev/null || true
    die "no built transformer_engine_torch wheel after ${t} s (rc $(cat "$TE_STAGE/build.rc" 2>/dev/null || echo running))"
  fi
}

cmd_install() {
  local want have
  if [ ! -f "$TE_STAGE/$CORE" ]; then
    want=$(cat "$TE_STAGE/cu13.count" 2>/dev/null) || die "nothing staged: run stage first"
    have=$(find "$TE_STAGE" -maxdepth 1 -name 'cu13.part*' | wc -l)
    [ "$have" = "$want" ] || die "$have of $want core parts staged; carry the rest first"
    cat "$TE_STAGE"/cu13.part* > "$TE_STAGE/$CORE"
    (cd "$TE_STAGE" && sha256sum -c cu13.sha256 >/dev/null) || {
      rm -f "$TE_STAGE/$CORE"; die "joined core wheel fails its sha256: a part is damaged"; }
    rm -f "$TE_STAGE"/cu13.part*
  fi
  mkdir -p "$TE_SITE"
  # The plain wheels (no overlapping folders) through pip; TE's two wheels both hold the
  # transformer_engine package (the core one a superset), which pip --target would replace
  # folder by folder, so they are unpacked over each other in order, as pip would into site.
  local plain=() f
  for f in "$TE_STAGE"/*.whl; do
    case "$(basename "$f")" in transformer_engine*) ;; *) plain+=("$f") ;; esac
  done
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$TE_SITE" \
    "${plain[@]}"
  python3 -m zipfile -e "$TE_STAGE"/transformer_engine-"$TE_VERSION"-py3-none-any.whl "$TE_SITE"
  python3 -m zipfile -e "$TE_STAGE/$CORE" "$TE_SITE"
  # Parts of a wheel built on an earlier machine, carried back in.
  if [ -z "$(built_wheel)" ] && ls "$TE_STAGE"/te_torch.part* >/dev/null 2>&1; then
    cat "$TE_STAGE"/te_torch.part* > "$TE_STAGE/$(cat "$TE_STAGE/te_torch.name")"
    log "using the carried built wheel $(cat "$TE_STAGE/te_torch.name")"
  fi
  [ -n "$(built_wheel)" ] || cmd_wait_build "${TE_BUILD_WAIT:-480}"
  python3 -m zipfile -e "$(built_wheel)" "$TE_SITE"
  PYTHONPATH="$TE_SITE" python3 - <<'PY'
import torch, transformer_engine, transformer_engine.pytorch as te
import megatron.core
x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
lin = te.Linear(512, 512, params_dtype=torch.bfloat16, device="cuda")
y = lin(x)
y.sum().backward()
torch.cuda.synchronize()
print(f"TE {transformer_engine.__version__} OK on {torch.cuda.get_device_name()}: "
      f"te.Linear fwd+bwd {tuple(y.shape)}; megatron-core {megatron.core.__version__}; "
      f"torch {torch.__version__}")
PY
  log "installed into $TE_SITE: export PYTHONPATH=$TE_SITE"
}

cmd_export() {
  local whl
  whl=$(built_wheel)
  [ -n "$whl" ] || die "no built wheel to export"
  [ -n "${OUT:-}" ] || die "OUT is not set (export runs on the device machine)"
  split -b 15M -d "$whl" "$OUT/te_torch.part"
  basename "$whl" > "$OUT/te_torch.name"
  cp "$TE_STAGE/build.seconds" "$OUT/" 2>/dev/null || true
  log "exported $(basename "$whl") as $(find "$OUT" -maxdepth 1 -name 'te_torch.part*' | wc -l) parts: copy them to .whl/te_built/"
}

case "${1:-}" in
  download) cmd_download ;;
  stage) cmd_stage ;;
  build) cmd_build ;;
  build-bg) cmd_build_bg ;;
  wait-build) cmd_wait_build "${2:-480}" ;;
  install) cmd_install ;;
  export) cmd_export ;;
  pythonpath) echo "$TE_SITE" ;;
  *) sed -n '2,22p' "$0"; exit 2 ;;
esac
