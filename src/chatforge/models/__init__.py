"""Model loading, adapters, heads and log-prob helpers."""


def base_model(lm):
    """The transformers model under a peft wrapper (`lm` itself when there is none)."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm
