"""Evaluation: the metric registry, per-example scores on validation and held-out, paired statistics, the LLM judge."""
