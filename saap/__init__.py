"""SAAP: structurally-aware adaptive pruning of LLaMA-family language models."""

__version__ = "0.1.0"
