"""The locality dispatcher: Megatron's alltoall dispatcher with a node-aware exchange.

``dispatcher`` (the MoE token dispatcher and what it runs with), ``schemes`` (flat, two-hop,
two-hop with dedup), ``traffic`` (exact copies and bytes per link, also for the cost model)
and ``collectives`` (uneven All-to-All on any device). Import from the modules: the cost model
reads ``traffic`` without loading Megatron.
"""
