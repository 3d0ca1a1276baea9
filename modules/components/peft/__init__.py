"""Parameter-efficient fine-tuning parts: SSF, adapters, side networks, low-bit codebooks, task files."""


def __getattr__(name: str):
    """Old checkpoints and configs name ``modules.components.peft.<X>`` for what now lives in ``peft/layers.py``."""
    import importlib

    try:
        return getattr(importlib.import_module(f"{__name__}.layers"), name)
    except AttributeError:
        raise AttributeError(f"module 'modules.components.peft' has no attribute '{name}'") from None
