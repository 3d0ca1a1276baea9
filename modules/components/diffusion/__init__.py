"""Diffusion parts: the Gaussian process and samplers, DiT, DiMR, DiffFit, the Frechet distance."""


def __getattr__(name: str):
    """Old checkpoints and configs name ``modules.components.diffusion.<X>`` for what now lives in ``diffusion/gaussian.py``."""
    import importlib

    try:
        return getattr(importlib.import_module(f"{__name__}.gaussian"), name)
    except AttributeError:
        raise AttributeError(f"module 'modules.components.diffusion' has no attribute '{name}'") from None
