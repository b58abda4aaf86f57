"""Inference: sampling from a model."""
