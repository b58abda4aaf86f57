"""Evaluation: bits-per-byte, preference margins and greedy samples."""
