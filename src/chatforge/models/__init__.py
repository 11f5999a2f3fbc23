"""Model loading, adapters, heads and log-prob helpers."""
