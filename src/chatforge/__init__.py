"""chatforge: train your own ChatGPT-style assistant at low cost.

SFT -> reward model -> PPO (the classic recipe), DPO and GRPO (the cheaper paths), with LoRA, QLoRA,
prefix and prompt tuning, on one CPU or many GPUs. Run `chatforge --help` to start.
Importing this package is cheap: torch and transformers load only where they are used.
"""

__version__ = "0.1.0"
