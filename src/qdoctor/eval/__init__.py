"""Evaluation: perplexity, zero-shot tasks, lm-eval backend."""
