"""Jupyter server extension: vGPU usage and tier controls (not built yet)."""
