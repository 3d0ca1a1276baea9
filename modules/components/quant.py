"""Quantization pieces in pure torch: BitNet b1.58 ternary layers, int8 conversion, HAWQ-style mixed precision.

* BitNet b1.58 (The Era of 1-bit LLMs; BitNet b1.58 Reloaded): ternary weights {-1, 0, +1} times a per-output-
  channel scale (absmean, or the median variant), 8-bit absmax activations, straight-through gradients.
* int8: torchao's pt2e flow (``torch.export`` + x86 Inductor quantizer): fake-quant QAT or calibrated PTQ with
  per-channel symmetric weights and per-tensor affine (static or dynamic) activations, converted to int8
  weights and lowered to int8 CPU kernels by ``torch.compile``.
* Mixed precision (HAWQ-v2): Hutchinson estimate of each layer's Hessian trace, then per-layer bit-widths that
  minimise sum(trace_i / n_i * ||Q_b(W_i) - W_i||^2) under a model-size budget.
* Layer-wise calibration (Improving Post Training Neural Quantization, AdaQuant): per layer, tune the weight so
  that its quantized output matches the float output on calibration inputs.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from modules.components.errors import ConfigError

QUANT_LAYERS = (nn.Linear, nn.Conv2d)


# --- straight-through quantizers -----------------------------------------------------------------
def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() whose gradient is the identity (straight-through estimator)."""
    return x + (x.round() - x).detach()


def ternary_scale(weight: torch.Tensor, method: str = "absmean", eps: float = 1e-5) -> torch.Tensor:
    """Per-output-channel scale (out, 1, ...) of a weight: mean(|W|) (BitNet b1.58) or median(|W|) (Reloaded)."""
    flat = weight.detach().abs().flatten(1)  # (out, fan_in)
    if method == "absmean":
        scale = flat.mean(dim=1)
    elif method == "median":
        scale = flat.median(dim=1).values
    else:
        raise ConfigError(f"unknown ternary scale method {method!r}: use 'absmean' or 'median'")
    return scale.clamp_min(eps).view(-1, *([1] * (weight.dim() - 1)))


def ternary_codes(weight: torch.Tensor, method: str = "absmean") -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes in {-1, 0, 1} with the shape of ``weight`` and the per-channel float scale (out,)."""
    scale = ternary_scale(weight, method)
    codes = (weight.detach() / scale).round().clamp(-1, 1).to(torch.int8)
    return codes, scale.flatten()


def ternary_weight(weight: torch.Tensor, method: str = "absmean") -> torch.Tensor:
    """Ternary weight ``scale * clamp(round(W / scale), -1, 1)`` with straight-through gradients to ``W``."""
    scale = ternary_scale(weight, method)
    quantized = (weight.detach() / scale).round().clamp(-1, 1) * scale
    return quantized + (weight - weight.detach())  # exact ternary values, identity gradient (as in BitNet)


def absmax_activation(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Symmetric absmax fake-quant of activations per token/sample (last dim for (B, N, D), (C,H,W) for images)."""
    qmax = 2 ** (bits - 1) - 1
    dims = tuple(range(1, x.dim())) if x.dim() == 4 else (-1,)
    scale = x.detach().abs().amax(dim=dims, keepdim=True).clamp_min(1e-5) / qmax
    return round_ste(x / scale).clamp(-qmax - 1, qmax) * scale


class BitLinear(nn.Linear):
    """nn.Linear with BitNet b1.58 ternary weights and absmax-quantized activations in the forward pass.

    Args:
        method: ``absmean`` or ``median`` weight scale.
        activation_bits: bits of the absmax activation quantizer; ``None`` keeps float activations.
    """

    method: str = "absmean"
    activation_bits: int | None = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_bits:
            x = absmax_activation(x, self.activation_bits)
        return nn.functional.linear(x, ternary_weight(self.weight, self.method), self.bias)


class BitConv2d(nn.Conv2d):
    """nn.Conv2d with BitNet b1.58 ternary weights (see :class:`BitLinear`)."""

    method: str = "absmean"
    activation_bits: int | None = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_bits:
            x = absmax_activation(x, self.activation_bits)
        return self._conv_forward(x, ternary_weight(self.weight, self.method), self.bias)


# --- layer swapping ------------------------------------------------------------------------------
def default_skip(model: nn.Module) -> list[str]:
    """Names kept in float by convention: a timm model's stem conv and classifier (from its pretrained_cfg)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = []
    for key in ("first_conv", "classifier"):
        value = cfg.get(key)
        names.extend([value] if isinstance(value, str) else list(value or []))
    return names


def quantizable_layers(model: nn.Module, skip: Sequence[str] = ()) -> dict[str, nn.Module]:
    """Linear/Conv2d submodules by name, leaving out ``skip`` names (and their children)."""
    def skipped(name: str) -> bool:
        return any(name == s or name.startswith(s + ".") for s in skip)

    return {name: m for name, m in model.named_modules() if isinstance(m, QUANT_LAYERS) and not skipped(name)}


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def to_bitnet(model: nn.Module, method: str = "absmean", activation_bits: int | None = 8,
              skip: Sequence[str] | None = None) -> list[str]:
    """Swap Linear/Conv2d layers for BitLinear/BitConv2d in place, sharing the same Parameter objects.

    Sharing keeps the optimizer's references and the state-dict keys; returns the swapped names.
    """
    skip = default_skip(model) if skip is None else skip
    swapped = []
    for name, layer in quantizable_layers(model, skip).items():
        if isinstance(layer, (BitLinear, BitConv2d)):
            continue
        cls = BitLinear if isinstance(layer, nn.Linear) else BitConv2d
        new = copy.copy(layer)  # shares parameters, buffers and hooks
        new.__class__ = cls
        new.method, new.activation_bits = method, activation_bits
        replace_submodule(model, name, new)
        swapped.append(name)
    return swapped


def export_ternary(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """``{layer: {"codes": int8 {-1,0,1}, "scale": (out,) float}}`` for every BitNet layer of ``model``."""
    return {
        name: dict(zip(("codes", "scale"), ternary_codes(m.weight, m.method)))
        for name, m in model.named_modules() if isinstance(m, (BitLinear, BitConv2d))
    }


def ternary_bytes(model: nn.Module) -> int:
    """Storage at 1.58 bits (packed 5 trits per byte) for ternary layers, fp32 for everything else."""
    total = 0
    ternary = {id(m.weight) for m in model.modules() if isinstance(m, (BitLinear, BitConv2d))}
    for p in model.state_dict(keep_vars=True).values():
        if id(p) in ternary:
            total += -(-p.numel() // 5) + p.shape[0] * 4  # codes + fp32 scale per channel
        else:
            total += p.numel() * p.element_size()
    return total


# --- uniform fake quant and layer-wise calibration -----------------------------------------------
def fake_quantize_weight(weight: torch.Tensor, bits: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Per-output-channel symmetric uniform fake-quant with straight-through gradients."""
    qmax = 2 ** (bits - 1) - 1
    if scale is None:
        scale = weight.detach().abs().flatten(1).amax(dim=1).clamp_min(1e-8) / qmax
        scale = scale.view(-1, *([1] * (weight.dim() - 1)))
    return round_ste(weight / scale).clamp(-qmax - 1, qmax) * scale


def _layer_forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return nn.functional.linear(x, weight, layer.bias)
    return layer._conv_forward(x, weight, layer.bias)


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[torch.Tensor],
                         max_rows: int = 2048) -> dict[str, torch.Tensor]:
    """The inputs each layer sees while ``model`` runs over ``batches`` (first ``max_rows`` rows per layer)."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    counts = dict.fromkeys(layers, 0)

    def hook(name):
        def record(_module, inputs, _output):
            if counts[name] < max_rows:
                seen[name].append(inputs[0].detach())
                counts[name] += inputs[0].shape[0]
        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        model.eval()
        for images in batches:
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(xs)[:max_rows] for name, xs in seen.items() if xs}


def calibrate_layer(layer: nn.Module, inputs: torch.Tensor, bits: int = 8, steps: int = 100, lr: float = 1e-4) -> float:
    """AdaQuant-style: tune ``layer.weight``/``bias`` in place so its ``bits``-bit output matches the float output.

    The per-channel scale stays fixed at the float weight's absmax / qmax, so a later per-channel min/max
    observer picks the same grid. Returns the relative output MSE after calibration.
    """
    with torch.no_grad():
        target = _layer_forward(layer, inputs, layer.weight)
        qmax = 2 ** (bits - 1) - 1
        scale = layer.weight.abs().flatten(1).amax(dim=1).clamp_min(1e-8) / qmax
        scale = scale.view(-1, *([1] * (layer.weight.dim() - 1)))
    def error(w, b):
        w_q = fake_quantize_weight(w.clamp(-scale * qmax, scale * qmax), bits, scale)
        out = nn.functional.linear(inputs, w_q, b) if isinstance(layer, nn.Linear) else \
            nn.functional.conv2d(inputs, w_q, b, layer.stride, layer.padding, layer.dilation, layer.groups)
        return (out - target).pow(2).mean()

    weight = layer.weight.detach().clone().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True) if layer.bias is not None else None
    optimizer = torch.optim.Adam([p for p in (weight, bias) if p is not None], lr=lr)
    best = (float("inf"), None, None)
    for _ in range(steps + 1):  # keeps the best iterate, so calibration never raises the error
        loss = error(weight, bias)
        if float(loss) < best[0]:
            best = (float(loss), weight.detach().clone(), None if bias is None else bias.detach().clone())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        layer.weight.copy_(best[1].clamp(-scale * qmax, scale * qmax))
        if layer.bias is not None:
            layer.bias.copy_(best[2])
        return best[0] / float(target.pow(2).mean().clamp_min(1e-12))


def calibrate_layerwise(model: nn.Module, batches: Sequence[torch.Tensor], bits: int = 8, steps: int = 100,
                        lr: float = 1e-4, skip: Sequence[str] = ()) -> dict[str, float]:
    """Layer-wise calibration of every Linear/Conv2d of ``model`` in place; returns each layer's relative MSE."""
    layers = quantizable_layers(model, skip)
    inputs = capture_layer_inputs(model, layers, batches)
    with torch.enable_grad():
        return {name: calibrate_layer(layers[name], x, bits, steps, lr) for name, x in inputs.items()}


# --- int8 through torchao's pt2e flow (x86 Inductor quantizer) ---------------------------------
def _pt2e():
    from torchao.quantization.pt2e import quantize_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer

    return quantize_pt2e, x86_inductor_quantizer


def is_convolutional(model: nn.Module) -> bool:
    """True when most weights sit in Conv2d layers (CNNs); False for Linear-dominated models (ViTs, MLPs)."""
    conv = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return conv > linear


def int8_quantizer(qat: bool = False):
    """torchao's x86 quantizer: per-channel symmetric int8 weights, per-tensor affine int8 activations.

    It annotates convolutions and Linear layers (with their fusable neighbours); attention softmax, LayerNorm
    and GELU stay float.
    """
    _, x86 = _pt2e()
    return x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config(is_qat=qat))


def export_model(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """``torch.export`` graph of ``model`` with a dynamic batch dimension (ConfigError if it cannot be exported)."""
    batch = torch.export.Dim("batch", min=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(model, (example,), dynamic_shapes=({0: batch},)).module()
    except Exception as err:  # data-dependent control flow and friends
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        raise ConfigError(f"{type(model).__name__} cannot be exported with torch.export for int8 "
                          f"({type(err).__name__}: {first}): quantize a traceable backbone") from err


def prepare_int8(model: nn.Module, example: torch.Tensor, qat: bool = False) -> nn.Module:
    """Export ``model`` and insert observers (PTQ, eval mode) or fake-quant modules (QAT, train mode).

    QAT folds BatchNorm into the preceding convolution's fake-quantized weight as in the paper recipe.
    ``.train()``/``.eval()`` keep working on the result, so Lightning can validate mid-training.
    """
    quantize_pt2e, _ = _pt2e()
    from torchao.quantization.pt2e import allow_exported_model_train_eval

    if qat:  # all-zero BN gammas (timm zero_init_last) give a zero per-channel weight range when folded
        with torch.no_grad():
            for bn in model.modules():
                if isinstance(bn, nn.BatchNorm2d) and bn.weight is not None:
                    bn.weight[bn.weight == 0] = 1e-3
    exported = export_model(model.train(qat), example)
    quantizer = int8_quantizer(qat=qat)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = quantize_pt2e.prepare_qat_pt2e(exported, quantizer) if qat else quantize_pt2e.prepare_pt2e(exported, quantizer)
    return allow_exported_model_train_eval(prepared)


@torch.no_grad()
def calibrate(prepared: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Run calibration batches through an observer-instrumented model (PTQ)."""
    prepared.eval()
    for images in batches:
        prepared(images)


def _drop_unused_attributes(graph: torch.fx.GraphModule) -> None:
    """Delete parameters/buffers no graph node reads (the float weights that int8 constants replaced)."""
    graph.graph.eliminate_dead_code()
    graph.recompile()
    used = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    for name in [n for n, _ in graph.named_parameters()] + [n for n, _ in graph.named_buffers()]:
        if name not in used:
            owner, _, leaf = name.rpartition(".")
            delattr(graph.get_submodule(owner) if owner else graph, leaf)


def convert_int8(prepared: nn.Module) -> torch.fx.GraphModule:
    """The int8 model of a prepared/QAT graph: int8 weight constants with quantize/dequantize around each op.

    Run as is, the ops execute in reference (float) arithmetic; :func:`compile_int8` lowers the same graph
    to fused x86 int8 kernels. The prepared model is left unchanged.
    """
    quantize_pt2e, _ = _pt2e()
    from torchao.quantization.pt2e import allow_exported_model_train_eval, move_exported_model_to_eval

    model = copy.deepcopy(prepared).cpu()
    move_exported_model_to_eval(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = quantize_pt2e.convert_pt2e(model)
    _drop_unused_attributes(converted)
    return allow_exported_model_train_eval(converted)


def quantize_linear_dynamic_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose Linear layers hold int8 weights (per channel) and quantize their inputs per
    token at run time (torchao ``quantize_``): PTQ without calibration for ViTs, whose activation outliers make
    static per-tensor ranges inaccurate. Convolutions (a ViT's patch embedding) stay float.
    """
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    model = copy.deepcopy(model).cpu().eval()
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return model


def compile_int8(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Inductor-compiled int8 model with frozen weights: the x86 int8 (oneDNN) kernels run on CPU.

    Weight freezing is what lets Inductor pre-pack the int8 weights; passing it through
    ``torch.compile(options=...)`` fails in torch 2.14, so the config is patched around each call instead
    (compilation happens on the first one). Inference only: calls run under ``no_grad``.
    """
    import torch._inductor.config as inductor_config

    compiled = torch.compile(model, dynamic=False)  # one specialised graph per batch shape: the fast kernels

    def run(images: torch.Tensor) -> torch.Tensor:
        with inductor_config.patch(freezing=True), torch.no_grad():
            return compiled(images)

    return run


def save_int8(model: nn.Module, example: torch.Tensor, path) -> None:
    """Write ``model`` as a torch.export program (``torch.export.load(path).module()`` gives it back)."""
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (example.cpu(),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))


def model_bytes(model: nn.Module) -> int:
    """Serialized size of the state dict (packed int8 weights count as stored)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


# --- mixed precision (HAWQ-v2) -------------------------------------------------------------------
def hutchinson_trace(loss_fn: Callable[[], torch.Tensor], params: dict[str, torch.Tensor], samples: int = 8,
                     generator: torch.Generator | None = None) -> dict[str, float]:
    """Tr(H) per named parameter block by Hutchinson's estimator E_v[v^T H v], v Rademacher.

    ``loss_fn`` recomputes the loss (on a fixed batch); the Hessian-vector products use double backward.
    """
    names = list(params)
    tensors = [params[n] for n in names]
    loss = loss_fn()
    grads = torch.autograd.grad(loss, tensors, create_graph=True)
    traces = dict.fromkeys(names, 0.0)
    for _ in range(samples):
        vs = [torch.randint(0, 2, t.shape, generator=generator).to(t) * 2 - 1 for t in tensors]
        hvs = torch.autograd.grad(grads, tensors, grad_outputs=vs, retain_graph=True)
        for name, v, hv in zip(names, vs, hvs):
            traces[name] += float((v * hv).sum()) / samples
    return traces


def quantization_error(weight: torch.Tensor, bits: int) -> float:
    """||Q_b(W) - W||^2 for per-channel symmetric uniform quantization."""
    with torch.no_grad():
        return float((fake_quantize_weight(weight, bits) - weight).pow(2).sum())


def allocate_bits(traces: dict[str, float], weights: dict[str, torch.Tensor], budget_bytes: float,
                  choices: Sequence[int] = (2, 4, 8)) -> dict[str, int]:
    """Per-layer bit-widths whose total weight size stays within ``budget_bytes``.

    Greedy HAWQ: start every layer at the highest bit-width, then repeatedly lower the layer whose next
    step down adds the least sensitivity (mean Hessian trace x quantization error) per byte saved.
    """
    choices = sorted(set(choices))
    size = lambda name, bits: weights[name].numel() * bits / 8  # noqa: E731
    minimum = sum(size(n, choices[0]) for n in weights)
    if minimum > budget_bytes:
        raise ConfigError(f"a budget of {budget_bytes:.0f} bytes is below the smallest possible size {minimum:.0f} "
                          f"(all layers at {choices[0]} bits): raise the budget or allow fewer bits")
    bits = dict.fromkeys(weights, choices[-1])
    cost = {(n, b): max(traces[n], 0.0) / weights[n].numel() * quantization_error(weights[n], b)
            for n in weights for b in choices}
    total = sum(size(n, bits[n]) for n in weights)
    while total > budget_bytes:
        best, best_ratio = None, float("inf")
        for n, b in bits.items():
            idx = choices.index(b)
            if idx == 0:
                continue
            lower = choices[idx - 1]
            ratio = (cost[(n, lower)] - cost[(n, b)]) / (size(n, b) - size(n, lower))
            if ratio < best_ratio:
                best, best_ratio = n, ratio
        lower = choices[choices.index(bits[best]) - 1]
        total -= size(best, bits[best]) - size(best, lower)
        bits[best] = lower
    return bits


@torch.no_grad()
def apply_weight_bits(model: nn.Module, bits: dict[str, int]) -> None:
    """Replace each named layer's weight by its per-channel ``bits``-bit fake-quantized value, in place."""
    for name, b in bits.items():
        layer = model.get_submodule(name)
        layer.weight.copy_(fake_quantize_weight(layer.weight, b))


def mixed_precision_bytes(model: nn.Module, bits: dict[str, int]) -> int:
    """Weight storage at the chosen bits (+ fp32 per-channel scales); all other tensors at their dtype."""
    quantized = {id(model.get_submodule(n).weight): b for n, b in bits.items()}
    total = 0
    for p in model.state_dict(keep_vars=True).values():
        if id(p) in quantized:
            total += -(-p.numel() * quantized[id(p)] // 8) + p.shape[0] * 4
        else:
            total += p.numel() * p.element_size()
    return total


def layer_hessian_traces(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                         skip: Sequence[str] = (), samples: int = 8, seed: int = 0) -> dict[str, float]:
    """Hutchinson Tr(H) of the cross-entropy loss w.r.t. each Linear/Conv2d weight, averaged over ``batches``.

    ``model(images)`` must return logits (B, num_classes). BatchNorm/dropout run in eval mode.
    """
    layers = quantizable_layers(model, skip)
    params = {name: layer.weight for name, layer in layers.items()}
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    totals = dict.fromkeys(params, 0.0)
    try:
        for images, labels in batches:
            traces = hutchinson_trace(lambda: nn.functional.cross_entropy(model(images), labels), params,
                                      samples, generator)
            for name, value in traces.items():
                totals[name] += value / len(batches)
    finally:
        model.train(was_training)
    return totals
