"""chatforge: train your own ChatGPT-style assistant at low cost.

SFT -> reward model -> PPO (the classic recipe), DPO and GRPO (the cheaper paths), with LoRA, QLoRA,
prefix and prompt tuning, on one CPU or many GPUs. Run `chatforge --help` to start.
Importing this package is cheap: torch and transformers load only where they are used.
"""

__version__ = "0.1.0"

import logging as _logging
import warnings as _warnings

# peft 0.21 asks transformers 5 for `is_gradient_checkpointing`, a deprecated alias, on every
# get_peft_model: one FutureWarning per run that the user can do nothing about.
_warnings.filterwarnings(
    "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
)

# DeepSpeed, imported by accelerate whenever it is installed, logs "Setting accelerator to CPU"
# on every command of a machine without a GPU: true and expected here, so not worth a line.
_logging.getLogger("DeepSpeed").addFilter(
    lambda record: not record.getMessage().startswith("Setting accelerator to CPU")
)
