"""Sampling: the one denoising loop, its hooks and steps, where a run starts, chunks, inversion, progress."""
