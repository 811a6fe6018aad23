"""Triton kernels, one file per op (kernel, launcher and entry point together)."""
