"""Triton kernels (imported lazily: mfcore works without triton). See docs/attention.md."""
