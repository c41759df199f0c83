# GPU image: reproduces the router comparison with one command.
#
#   docker build -t megatron-locmoe .
#   docker run --gpus all --ipc=host --rm -v "$PWD/runs:/workspace/megatron-locmoe/runs" \
#       megatron-locmoe router-sweep
#
# Base: NGC PyTorch, pinned by tag (CUDA, NCCL, Transformer Engine and apex inside; 26.06 is
# the image Megatron-LM's CI used at tag core_v0.19.0). Megatron-LM at core_v0.19.0 (the
# version megatron-locmoe-patch targets) provides pretrain_gpt.py and its sibling builders;
# Megatron itself is the megatron-core 0.19.2 wheel the plugin pins (every adaptor patch was
# checked on it), so the checkout's own megatron/ package, which would shadow the wheel from
# the script's folder, is removed. The plugin is installed with its wandb extra, the patch is
# applied, and the offline corpus is built into the image.
FROM nvcr.io/nvidia/pytorch:26.06-py3

ARG MEGATRON_LM_REPO=https://github.com/NVIDIA/Megatron-LM.git
ARG MEGATRON_LM_TAG=core_v0.19.0

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    WANDB_MODE=offline \
    LOCMOE_HOME=/workspace/megatron-locmoe \
    LOCMOE_ENTRY=/opt/Megatron-LM/pretrain_gpt.py

RUN git clone --depth 1 --branch "${MEGATRON_LM_TAG}" "${MEGATRON_LM_REPO}" /opt/Megatron-LM \
 && rm -rf /opt/Megatron-LM/megatron /opt/Megatron-LM/.git

WORKDIR /workspace/megatron-locmoe
COPY pyproject.toml README.md Makefile ./
COPY megatron_locmoe ./megatron_locmoe
COPY configs ./configs
COPY launch ./launch
COPY patches ./patches
COPY benchmarks ./benchmarks
COPY docker/entrypoint.sh /usr/local/bin/locmoe-entrypoint

# NGC's pip constraints keep its torch; megatron-core 0.19.2 comes from PyPI.
RUN pip install -e ".[wandb]" \
 && megatron-locmoe-patch /opt/Megatron-LM \
 && python -m megatron_locmoe.sim.data --out data/pydoc \
 && python -m megatron_locmoe.launch --config router-sweep --entry "${LOCMOE_ENTRY}" --dry-run

ENTRYPOINT ["locmoe-entrypoint"]
CMD ["router-sweep"]
