"""Evaluation and training loops."""
