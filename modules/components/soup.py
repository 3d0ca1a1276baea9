"""Model soups (Wortsman et al., 2022): average the weights of models fine-tuned from one initialisation.

Pure torch over state dicts: uniform soup, greedy soup (ingredients in order of held-out score, each kept only
if it raises the soup's held-out score), an architecture check, and BatchNorm statistic recomputation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from modules.components.errors import ConfigError

StateDict = dict[str, torch.Tensor]


def check_compatible(states: Sequence[StateDict], names: Sequence[str] | None = None) -> None:
    """Raise ConfigError unless every state dict has the keys and shapes of the first one."""
    if not states:
        raise ConfigError("a soup needs at least one ingredient checkpoint")
    names = list(names or [f"ingredient {i}" for i in range(len(states))])
    ref = states[0]
    for name, state in zip(names[1:], states[1:]):
        missing, extra = sorted(set(ref) - set(state)), sorted(set(state) - set(ref))
        shapes = sorted(k for k in set(ref) & set(state) if ref[k].shape != state[k].shape)
        if missing or extra or shapes:
            parts = []
            if missing:
                parts.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
            if extra:
                parts.append(f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
            if shapes:
                k = shapes[0]
                parts.append(f"{len(shapes)} shape mismatches, e.g. {k} {tuple(state[k].shape)} vs {tuple(ref[k].shape)}")
            raise ConfigError(f"soup ingredients have different architectures: {name} vs {names[0]}: "
                              f"{'; '.join(parts)}. Soups need fine-tunes of one model from one initialisation")


def average_states(states: Sequence[StateDict], weights: Sequence[float] | None = None) -> StateDict:
    """Weighted mean of floating-point tensors; integer tensors (e.g. BN ``num_batches_tracked``) from the first."""
    check_compatible(states)
    weights = [1.0 / len(states)] * len(states) if weights is None else [w / sum(weights) for w in weights]
    soup = {}
    for key, ref in states[0].items():
        if ref.is_floating_point():
            acc = torch.zeros_like(ref, dtype=torch.float64)
            for w, state in zip(weights, states):
                acc += w * state[key].to(torch.float64)
            soup[key] = acc.to(ref.dtype)
        else:
            soup[key] = ref.clone()
    return soup


def uniform_soup(states: Sequence[StateDict]) -> StateDict:
    """The uniform soup: the plain mean of all ingredients."""
    return average_states(states)


def greedy_soup(states: Sequence[StateDict], evaluate: Callable[[StateDict], float],
                scores: Sequence[float] | None = None) -> tuple[StateDict, list[int], float]:
    """Greedy soup. ``evaluate(state) -> held-out score`` (higher is better).

    Ingredients are tried in decreasing order of their own score; among equal scores the later ingredient
    (higher index) comes first, as the paper's code (mlfoundations/model-soups ``main.py`` sorts ascending,
    stably, then reverses the list): ties are common with small held-out sets, whose accuracy moves in
    steps of 1/N, and they decide which ingredient starts the soup. Each is kept only if the soup's score
    rises strictly (``>``, as the paper's code: a tie adds nothing and keeps the smaller soup), so the
    result never scores below the best ingredient on the held-out set. ``evaluate`` must score a split
    held out from training and distinct from the reported one (the paper: 2% of ImageNet train).

    Returns:
        (soup state dict, indices of the kept ingredients, the soup's held-out score).
    """
    check_compatible(states)
    scores = list(scores) if scores is not None else [evaluate(s) for s in states]
    order = sorted(range(len(states)), key=lambda i: scores[i])[::-1]  # stable ascending, reversed
    kept, best = [order[0]], scores[order[0]]
    soup = states[order[0]]
    for i in order[1:]:
        candidate = average_states([states[j] for j in kept + [i]])
        score = evaluate(candidate)
        if score > best:
            kept, best, soup = kept + [i], score, candidate
    return soup, kept, best


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Reset and re-estimate BatchNorm running statistics over ``batches`` (cumulative average); no-op without BN."""
    if has_batchnorm(model):
        update_bn(batches, model)
