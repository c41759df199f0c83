# Ascend image (910B): CANN + torch_npu + the plugin; presets run through launch/ascend.sh.
#
#   docker build -f docker/ascend.Dockerfile -t megatron-locmoe:ascend .
#   on every node (devices and driver from the host, as Ascend's container guide does):
#   docker run --rm --network host --ipc=host \
#       --device /dev/davinci0 ... --device /dev/davinci7 \
#       --device /dev/davinci_manager --device /dev/devmm_svm --device /dev/hisi_hdc \
#       -v /usr/local/dcmi:/usr/local/dcmi -v /usr/local/bin/npu-smi:/usr/local/bin/npu-smi \
#       -v /usr/local/Ascend/driver:/usr/local/Ascend/driver:ro \
#       megatron-locmoe:ascend ascend-910b-2node --nodes 2 --node-rank R --master-addr NODE0
#
# Base: Ascend's CANN 9.1.0 image for 910B with Python 3.12 (megatron-core 0.19 needs 3.12),
# pinned by tag; torch 2.10.0 (CPU wheel: torch_npu supplies the device) with the matching
# torch-npu 2.10.0.post4. Training entry: the plugin's megatron_locmoe.pretrain_gpt (no
# Megatron-LM checkout needed); every rank imports torch_npu first (python -m
# megatron_locmoe.launch --worker).
FROM quay.io/ascend/cann:9.1.0-910b-ubuntu22.04-py3.12

ARG TORCH_VERSION=2.10.0
ARG TORCH_NPU_VERSION=2.10.0.post4

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    WANDB_MODE=offline \
    LOCMOE_HOME=/workspace/megatron-locmoe \
    LOCMOE_LAUNCH=/workspace/megatron-locmoe/launch/ascend.sh

RUN pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu \
 && pip install "torch-npu==${TORCH_NPU_VERSION}"

WORKDIR /workspace/megatron-locmoe
COPY pyproject.toml README.md Makefile ./
COPY megatron_locmoe ./megatron_locmoe
COPY configs ./configs
COPY launch ./launch
COPY patches ./patches
COPY docker/entrypoint.sh /usr/local/bin/locmoe-entrypoint

RUN pip install -e ".[wandb]" \
 && python -m megatron_locmoe.sim.data --out data/pydoc

ENTRYPOINT ["locmoe-entrypoint"]
CMD ["ascend-910b-2node", "--dry-run", "--master-addr", "127.0.0.1"]
