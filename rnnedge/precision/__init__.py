"""Reduced precision (int8, fp16): conversion, gate policy, providers."""
