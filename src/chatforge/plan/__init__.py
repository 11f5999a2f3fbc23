"""Planning before training: memory and compute, from a model's shape alone (no torch needed).

- `chatforge.plan.memory`: what fits where. `ModelShape.from_hf_config(config)` counts parameters,
  `estimate(shape, method="lora", stage="ppo", ...)` breaks peak memory into weights, gradients,
  optimizer states, activations, logits and KV cache, and `fits` / `format_table` / `describe`
  report it (`chatforge plan MODEL_OR_PRESET --method lora ...`).
- `chatforge.plan.scaling`: how much to train. Chinchilla token budgets, 6ND training FLOPs, time and
  cost, and the LLaMA-style size `PRESETS` used to pretrain from scratch.
"""
