"""The launcher: YAML presets (``configs/``) turned into checked torchrun / Slurm / Ascend
commands, or into a run on the simulated cluster. ``python -m megatron_locmoe.launch --help``.

- ``presets``: a preset read, overridden and translated into Megatron flags; the layout and
  Megatron's own parser as checks;
- ``plan``: the preset checked against the cluster, and what runs where (one torchrun command
  per node, or the CPU loop's settings);
- ``data_step``: the corpus the runs read, built before the first run;
- ``torchrun``: this node's torchrun, logged with signals forwarded; the Ascend rank entry;
- ``cpu_settings`` / ``cpu``: Megatron's flags as the CPU loop's settings; the runs trained on
  the simulated cluster;
- ``manifest``: each run's ``launch.json`` (command, flags, commit, versions);
- ``cli``: the command (options, the dry run's text, the runs in order).
"""
