"""The locality sweep on the simulated cluster (CPU, gloo): resumable, results in
benchmarks/results/locality_sweep.json and PNGs in benchmarks/results/locality_sweep_png/.

    python benchmarks/locality_sweep.py --dry-run                  # what is left to run
    nohup nice -n 10 python benchmarks/locality_sweep.py --progress on > runs/sweep.log 2>&1 &
    python benchmarks/locality_sweep.py --priority 1 --layouts 8x1,16x1   # the main question

What it runs and records: ``megatron_locmoe/analysis/sweep.py``. Finished runs (``runs/locality_sweep/
<layout>/<run>/run.json`` with the same settings) are skipped, so the same command resumes.
"""

from megatron_locmoe.analysis.sweep import main

if __name__ == "__main__":
    main()
