"""`Frozen`: the one wrapper for auxiliary networks that are used but never trained.

Teachers (KD, MR-MAE), the A-CLIP EMA scorer, linear-probe encoders and the Frechet feature classifier
are all: never trainable, always in eval mode (fixed norm statistics, no dropout / drop-path, whatever
``.train()`` the owner receives), moved with the owning module, and, unless ``in_checkpoint``, left out of
the owner's checkpoint (they are rebuilt from their own source on load, so a student checkpoint does not
carry a teacher ten times its size).
"""

from __future__ import annotations

from torch import nn


class Frozen(nn.Module):
    """Hold ``module`` frozen: ``requires_grad=False``, eval mode always, optionally absent from state dicts.

    Args:
        module: the network (built and loaded by its owner).
        in_checkpoint: keep its weights in the owner's ``state_dict`` (an EMA scorer whose state is
            training state; a probe's encoder that makes the checkpoint self-contained), under the names
            they would have without the wrapper (``owner.backbone.x``, not ``owner.backbone.module.x``).
            When False the keys are dropped on save and filled from the live module on load, so strict
            loading works.
    """

    def __init__(self, module: nn.Module, in_checkpoint: bool = False):
        super().__init__()
        self.module = module.requires_grad_(False).eval()
        self.in_checkpoint = in_checkpoint
        self.train(False)
        self.register_state_dict_post_hook(_unwrapped_keys if in_checkpoint else _drop_own_keys)
        self.register_load_state_dict_pre_hook(_wrapped_keys if in_checkpoint else _fill_own_keys)

    def train(self, mode: bool = True) -> "Frozen":
        return super().train(False)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _drop_own_keys(module: Frozen, state_dict: dict, prefix: str, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _fill_own_keys(module: Frozen, state_dict: dict, prefix: str, local_metadata, strict, missing, unexpected, errors) -> None:
    for key, value in module.module.state_dict(prefix=f"{prefix}module.").items():
        state_dict.setdefault(key, value)


def _unwrapped_keys(module: Frozen, state_dict: dict, prefix: str, local_metadata) -> None:
    inner = f"{prefix}module."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _wrapped_keys(module: Frozen, state_dict: dict, prefix: str, local_metadata, strict, missing, unexpected, errors) -> None:
    # every saved key under ``prefix`` is unwrapped (even ``prefix.module.x`` of an inner ``.module``)
    for key in [k for k in state_dict if k.startswith(prefix)]:
        state_dict[f"{prefix}module.{key[len(prefix):]}"] = state_dict.pop(key)
