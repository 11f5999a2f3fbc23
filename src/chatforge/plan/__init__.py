"""Planning before training: memory and compute, from a model's shape alone (no torch needed).

- `chatforge.plan.memory`: what fits where. `ModelShape.from_hf_config(config)` counts parameters,
  `estimate(shape, method="lora", stage="ppo", ...)` breaks peak memory into weights, gradients,
  optimizer states, activations, logits and KV cache, and `fits` / `format_table` / `describe`
  report it (`chatforge plan MODEL_OR_PRESET --method lora ...`).
- `chatforge.plan.scaling`: how much to train. Chinchilla token budgets, 6ND training FLOPs, time and
  cost, the LLaMA-style size `PRESETS` used to pretrain from scratch and the `WIDTHxDEPTH` dial.
- `chatforge.plan.law`: the loss law L(N, D) = E + A/N^alpha + B/D^beta (published Chinchilla fit
  or a study's), compute-optimal N and D, and the training + serving optimum
  (`chatforge plan --budget C --serve-tokens T`).
- `chatforge.plan.fit`: fitting the law to runs (Chinchilla approaches 3 and 2) with a bootstrap;
  imports numpy and torch when called.
"""

__all__ = ["fit", "law", "memory", "scaling"]
