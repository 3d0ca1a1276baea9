"""Quantization pieces in pure torch: int8 conversion, uniform fake quant, layer-wise calibration, layer lookup.

BitNet b1.58 lives in ``ternary.py`` and HAWQ mixed precision in ``hawq.py``; both build on the helpers here.

* int8: torchao's pt2e flow (``torch.export`` + x86 Inductor quantizer): fake-quant QAT or calibrated PTQ with
  per-channel symmetric weights and per-tensor affine (static or dynamic) activations, converted to int8
  weights and lowered to int8 CPU kernels by ``torch.compile``.
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


# --- layer lookup --------------------------------------------------------------------------------
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


def freeze_batchnorm_statistics(prepared: torch.fx.GraphModule) -> bool:
    """Make the training-mode batch norms of an exported QAT graph normalise with their running statistics.

    The final phase of the standard QAT recipe (torch.ao's ``freeze_bn_stats``; in pt2e, PyTorch's QAT
    tutorial sets the ``training`` argument of the graph's batch-norm nodes to False): the statistics stop
    moving and the folded weights see the values conversion will use. torchao's ``.train()`` turns the nodes
    back to training mode, so call this again after each ``.train()``. Returns True when a node changed.
    """
    changed = False
    for node in prepared.graph.nodes:
        if node.target in (torch.ops.aten.batch_norm.default, torch.ops.aten._native_batch_norm_legit.default) \
                and node.args[5] is True:  # (input, weight, bias, running_mean, running_var, training, ...)
            node.args = (*node.args[:5], False, *node.args[6:])
            changed = True
    if changed:
        prepared.recompile()
    return changed


def freeze_observers(prepared: nn.Module) -> None:
    """Stop the fake-quant observers of a prepared graph: scales and zero points keep their current values."""
    from torchao.quantization.pt2e import disable_observer

    prepared.apply(disable_observer)


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
