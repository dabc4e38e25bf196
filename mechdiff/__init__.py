"""mechdiff: fair, causal, reproducible diffing of a base LLM against a fine-tuned derivative."""

__version__ = "0.1.0"
