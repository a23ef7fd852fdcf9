"""planer: latency-aware sparsely activated Transformers (PLANER) for your own hardware."""

__version__ = "0.1.0"
