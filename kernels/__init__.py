"""Fused kernels for GRPO (installed as megammr.kernels). Filled in by the kernels issue."""
