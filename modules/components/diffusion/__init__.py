"""Diffusion parts: the Gaussian process and samplers, DiT, DiMR, DiffFit, the Frechet distance."""
