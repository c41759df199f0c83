"""The simulated cluster on one machine: N nodes of gloo ranks, the CPU training loop that runs
Megatron-Core's model on it, its checkpoints, the offline corpus, and small real Megatron MoE
layers for tests and benchmarks. Not needed on a real cluster; the plugin's core never imports
it."""
