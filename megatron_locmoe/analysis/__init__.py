"""Reading runs: the demo that trains every router on the simulated cluster, the locality
sweep, the report and the W&B dashboard built from their logs, and the cost model that turns
measured routing statistics into modeled step time on a real cluster."""
