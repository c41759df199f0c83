"""The launcher: YAML presets (``configs/``) turned into checked torchrun / Slurm / Ascend
commands, or into a run on the simulated cluster. ``python -m megatron_locmoe.launch --help``.
"""
