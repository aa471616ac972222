"""Evaluation: perplexity on local corpora and zero-shot multiple choice through lm-evaluation-harness."""
