"""Evaluation: perplexity, zero-shot accuracy and generation samples."""
