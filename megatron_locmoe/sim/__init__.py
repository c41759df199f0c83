"""The simulated cluster on one machine: N nodes of gloo ranks, the CPU training loop that runs
Megatron-Core's model on it, its checkpoints, the offline corpus (and the check of Megatron's
dataset files that pretrain_gpt also runs), and small real Megatron MoE layers for tests and
benchmarks. The plugin's core (config to adaptor) never imports it."""
