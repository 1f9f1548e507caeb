"""Triton Inference Server model repositories."""
