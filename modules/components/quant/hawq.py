"""HAWQ mixed precision in pure torch: Hessian traces per layer, then bit-widths solved exactly under a budget.

* Traces (HAWQ-V2): Hutchinson's estimator ``Tr(H) = E_v[v^T H v]`` with Rademacher ``v``, drawn until the
  running mean moves by less than ``tol`` relative to itself, as PyHessian's ``trace(maxIter=100, tol=1e-3)``;
  each layer stops on its own criterion. The Hessian is that of the mean loss over the given batches.
* Bits (HAWQ-V2/V3): minimise the sensitivity ``sum_i Tr(H_i) / n_i * ||Q_{b_i}(W_i) - W_i||^2`` subject to
  ``sum_i n_i * b_i / 8 <= budget`` bytes. This is a multiple-choice knapsack, solved exactly by dynamic
  programming over sizes (the Pareto frontier of (bits, sensitivity) after each layer), where HAWQ-V3 uses an
  integer program; layers given fixed bits (the first conv and the classifier at 8 in HAWQ-V3) use their
  share of the budget.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from modules.components.errors import ConfigError
from modules.components.quant.int8 import fake_quantize_weight, quantizable_layers


# --- Hessian traces ------------------------------------------------------------------------------
def hutchinson_trace(loss_fns: Sequence[Callable[[], torch.Tensor]], params: Mapping[str, torch.Tensor],
                     tol: float = 1e-3, max_samples: int = 100, generator: torch.Generator | None = None,
                     ) -> tuple[dict[str, float], dict[str, int]]:
    """Tr(H) per named parameter block of the mean of ``loss_fns``' losses (each recomputes one batch's loss).

    Draws stop for a block once ``|mean_k - mean_{k-1}| / (|mean_{k-1}| + 1e-6) < tol`` (PyHessian's rule,
    ``mean_0 = 0``) or after ``max_samples``. Returns the traces and the draws each block used.
    """
    names = list(params)
    tensors = [params[n] for n in names]
    grads = [torch.autograd.grad(fn(), tensors, create_graph=True) for fn in loss_fns]
    means, used = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0)
    sums = dict.fromkeys(names, 0.0)
    active = set(names)
    for draw in range(1, max_samples + 1):
        vs = [torch.randint(0, 2, t.shape, generator=generator).to(t) * 2 - 1 for t in tensors]
        vhv = dict.fromkeys(names, 0.0)
        for batch_grads in grads:
            hvs = torch.autograd.grad(batch_grads, tensors, grad_outputs=vs, retain_graph=True)
            for name, v, hv in zip(names, vs, hvs):
                vhv[name] += float((v * hv).sum()) / len(grads)
        for name in list(active):
            sums[name] += vhv[name]
            previous, means[name], used[name] = means[name], sums[name] / draw, draw
            if abs(means[name] - previous) / (abs(previous) + 1e-6) < tol:
                active.discard(name)
        if not active:
            break
    return means, used


def layer_hessian_traces(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                         layers: Sequence[str], tol: float = 1e-3, max_samples: int = 100,
                         seed: int = 0) -> tuple[dict[str, float], dict[str, int]]:
    """Hutchinson Tr(H) of the cross-entropy loss w.r.t. each named layer's weight (see :func:`hutchinson_trace`).

    ``model(images)`` must return logits (B, num_classes). BatchNorm/dropout run in eval mode.
    """
    params = {name: model.get_submodule(name).weight for name in layers}
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)

    def loss_of(images, labels):
        return lambda: nn.functional.cross_entropy(model(images), labels)

    try:
        return hutchinson_trace([loss_of(x, y) for x, y in batches], params, tol, max_samples, generator)
    finally:
        model.train(was_training)


# --- bit allocation ------------------------------------------------------------------------------
def quantization_error(weight: torch.Tensor, bits: int) -> float:
    """||Q_b(W) - W||^2 for per-channel symmetric uniform quantization."""
    with torch.no_grad():
        return float((fake_quantize_weight(weight, bits) - weight).pow(2).sum())


def sensitivities(traces: Mapping[str, float], weights: Mapping[str, torch.Tensor],
                  choices: Sequence[int]) -> dict[str, dict[int, float]]:
    """HAWQ-V2's ``Omega_i(b) = Tr(H_i) / n_i * ||Q_b(W_i) - W_i||^2`` (negative trace estimates count as 0)."""
    return {name: {b: max(traces[name], 0.0) / w.numel() * quantization_error(w, b) for b in choices}
            for name, w in weights.items()}


def solve_knapsack(sizes: Mapping[str, Mapping[int, int]], costs: Mapping[str, Mapping[int, float]],
                   capacity: int) -> dict[str, int] | None:
    """Exact multiple-choice knapsack: one option per layer, total size <= ``capacity``, least total cost.

    Dynamic programming over sizes: after each layer only the Pareto frontier of (size, cost) is kept
    (a state is dropped when a smaller-or-equal size has a smaller-or-equal cost), which is exact. Returns
    ``{layer: option}``, or None when even the smallest options exceed ``capacity``.
    """
    if capacity < 0:
        return None
    frontier: list[tuple[int, float, int, int | None]] = [(0, 0.0, -1, None)]  # (size, cost, parent, option)
    history = []
    for name in sizes:
        candidates = [(size + sizes[name][b], cost + costs[name][b], parent, b)
                      for parent, (size, cost, _, _) in enumerate(frontier) for b in sizes[name]
                      if size + sizes[name][b] <= capacity]
        candidates.sort(key=lambda state: (state[0], state[1]))
        frontier = []
        for state in candidates:
            if not frontier or state[1] < frontier[-1][1]:
                frontier.append(state)
        if not frontier:
            return None
        history.append(frontier)
    index, choice = len(history[-1]) - 1 if history else 0, {}  # costs fall as sizes grow: take the last state
    for name, states in zip(reversed(list(sizes)), reversed(history)):
        _, _, index, choice[name] = states[index]
    return {name: choice[name] for name in sizes}


def allocate_bits(traces: Mapping[str, float], weights: Mapping[str, torch.Tensor], budget_bytes: float,
                  choices: Sequence[int] = (2, 4, 8), fixed: Mapping[str, int] | None = None) -> dict[str, int]:
    """Per-layer bit-widths of least total sensitivity whose weights fit in ``budget_bytes`` (exact).

    ``fixed`` layers get their given bits and take their size out of the budget; every other layer of
    ``weights`` gets one of ``choices``. Raises ConfigError when no assignment fits.
    """
    fixed = dict(fixed or {})
    choices = sorted(set(choices))
    free = {n: w for n, w in weights.items() if n not in fixed}
    capacity = int(budget_bytes * 8) - sum(weights[n].numel() * b for n, b in fixed.items())  # in bits
    sizes = {n: {b: w.numel() * b for b in choices} for n, w in free.items()}
    solution = solve_knapsack(sizes, sensitivities(traces, free, choices), capacity)
    if solution is None:
        minimum = (sum(w.numel() * choices[0] for w in free.values()) + int(budget_bytes * 8) - capacity) / 8
        raise ConfigError(f"a budget of {budget_bytes:.0f} bytes is below the smallest possible size {minimum:.0f} "
                          f"(free layers at {choices[0]} bits, fixed layers as set): raise the budget or allow "
                          "fewer bits")
    return {n: fixed.get(n, solution.get(n)) for n in weights}


@torch.no_grad()
def apply_weight_bits(model: nn.Module, bits: Mapping[str, int]) -> None:
    """Replace each named layer's weight by its per-channel ``bits``-bit fake-quantized value, in place."""
    for name, b in bits.items():
        layer = model.get_submodule(name)
        layer.weight.copy_(fake_quantize_weight(layer.weight, b))


def mixed_precision_bytes(model: nn.Module, bits: Mapping[str, int]) -> int:
    """Weight storage at the chosen bits (+ fp32 per-channel scales); all other tensors at their dtype."""
    quantized = {id(model.get_submodule(n).weight): b for n, b in bits.items()}
    total = 0
    for p in model.state_dict(keep_vars=True).values():
        if id(p) in quantized:
            total += -(-p.numel() * quantized[id(p)] // 8) + p.shape[0] * 4
        else:
            total += p.numel() * p.element_size()
    return total


def pinned_layers(model: nn.Module, names: Sequence[str], skip: Sequence[str] = ()) -> list[str]:
    """The quantizable layers at or under ``names`` (e.g. a deep stem ``conv1`` holds three convs)."""
    return [n for n in quantizable_layers(model, skip) if any(n == p or n.startswith(p + ".") for p in names)]
