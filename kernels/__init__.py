"""Triton kernels of oars-fast, installed as `oars_fast.kernels`. Imports torch and triton only."""
