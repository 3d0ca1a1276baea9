"""Quantization components and callbacks: int8 QAT/PTQ, BitNet b1.58, HAWQ mixed precision."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from callbacks.quantization import BitNet, MixedPrecision, PostTrainingQuantization, QuantizationAwareTraining
from modules.components import quant
from modules.components.errors import ConfigError
from tests.test_callbacks import fashion_tensors, tiny_module


@pytest.fixture(scope="module")
def data():
    return fashion_tensors(128)


def test_ternary_weights_take_three_values_per_channel_scale():
    torch.manual_seed(0)
    for method in ("absmean", "median"):
        weight = torch.randn(6, 4, 3, 3)
        w_q = quant.ternary_weight(weight, method)
        scale = quant.ternary_scale(weight, method).flatten()
        for row, s in zip(w_q.flatten(1), scale):
            values = torch.unique(row)
            assert len(values) == 3
            torch.testing.assert_close(values, torch.stack([-s, torch.zeros_like(s), s]))
        codes, scale2 = quant.ternary_codes(weight, method)
        assert set(codes.unique().tolist()) == {-1, 0, 1}
        torch.testing.assert_close(codes.float() * scale2.view(-1, 1, 1, 1), w_q)
    torch.testing.assert_close(quant.ternary_scale(torch.tensor([[1.0, -2.0, 6.0]]), "median").flatten(), torch.tensor([2.0]))


def test_ternary_straight_through_gradient():
    weight = torch.randn(4, 8, requires_grad=True)
    quant.ternary_weight(weight).mul(torch.arange(8.0)).sum().backward()
    torch.testing.assert_close(weight.grad, torch.arange(8.0).expand(4, 8))


def test_bitnet_callback_swaps_layers_and_trains(tmp_path, data):
    torch.manual_seed(0)
    module = tiny_module("test_resnet")
    first = {id(p) for p in module.parameters()}
    callback = BitNet(method="median")
    pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               default_root_dir=tmp_path, callbacks=[callback], num_sanity_val_steps=0).fit(
        module, DataLoader(data, batch_size=32))
    assert callback.swapped and "conv1" not in " ".join(callback.swapped[:0])
    assert "conv1" not in callback.swapped and "fc" not in callback.swapped  # timm stem and head stay float
    assert {id(p) for p in module.parameters()} == first
    exported = torch.load(tmp_path / "quantized" / "ternary.pt")
    codes = exported[callback.swapped[0]]["codes"]
    assert codes.dtype == torch.int8 and set(codes.unique().tolist()) <= {-1, 0, 1}
    with pytest.raises(ConfigError, match="absmean"):
        BitNet(method="mean")


def _int8_weights(model: nn.Module) -> int:
    return sum(v.numel() for v in model.state_dict().values() if v.dtype == torch.int8)


def _classifier_code_step(int8: torch.fx.GraphModule) -> torch.Tensor:
    """Per class, how much one code step of every classifier input moves the logit: s_in * ||W_j||_1."""
    linear = next(n for n in int8.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.linear.default)
    activation, weight = linear.args[0], linear.args[1]  # dequantize_per_tensor(x), dequantize_per_channel(W)
    assert "dequantize_per_tensor" in str(activation.target) and "dequantize_per_channel" in str(weight.target)
    s_in = float(activation.args[1])
    codes, scale = (getattr(int8, a.target) for a in weight.args[:2])
    return s_in * (codes.float() * scale.view(-1, 1)).abs().sum(dim=1)


def test_int8_output_within_tolerance_of_fake_quant(data):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    images, labels = data.tensors[0][:32], data.tensors[1][:32]
    prepared = quant.prepare_int8(model, images, qat=True)
    prepared.eval()
    quant.calibrate(prepared, [images])  # eval-mode pass: weight and activation ranges see the folded BN
    from torchao.quantization.pt2e import disable_observer

    prepared.apply(disable_observer)  # fake-quant keeps its ranges; in eval mode observers would still move them
    int8 = quant.convert_int8(prepared)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert _int8_weights(int8) >= 0.9 * weights  # the convolutions and the head hold int8 weights now
    assert not any(p.dtype == torch.float32 and p.dim() == 4 for p in int8.state_dict().values())
    with torch.no_grad():
        fake, reference, real = prepared(images), int8(images), quant.compile_int8(int8)(images)
    # The bound comes from int8 arithmetic, not from one CPU: the classifier sees uint8 codes of scale s, so
    # implementations that round one intermediate value differently (x86 kernels with or without VNNI/AMX
    # requantize fused conv+add+relu outputs directly; fake-quant folds BN before rounding) move a class
    # logit by s * sum_i |W_ji| per code step of every input. A few steps is rounding; a wrong scale, a
    # dropped BN or an unquantized branch moves the logits by tens of steps.
    step = _classifier_code_step(int8)  # (classes,) logit change per code step of the classifier input
    for other in (reference, real):
        steps = (fake - other).abs() / step
        assert steps.max() <= 4 and steps.mean() <= 1
    assert (fake - real).abs().max() < 0.2 * fake.abs().max()
    assert quant.model_bytes(int8) < quant.model_bytes(model) / 2.5


def test_qat_callback_converts_and_saves_a_loadable_program(tmp_path, data):
    torch.manual_seed(0)
    module = tiny_module("test_resnet")
    callback = QuantizationAwareTraining(start_epoch=1)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=tmp_path, callbacks=[callback],
                         num_sanity_val_steps=0, limit_train_batches=2)
    trainer.fit(module, DataLoader(data, batch_size=32))
    assert isinstance(module.backbone, torch.fx.GraphModule)
    # the optimizer trains the fake-quant graph's parameters, whichever objects export produced
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in module.backbone.parameters()} <= optimized
    assert callback.int8_model is not None and _int8_weights(callback.int8_model) > 0
    loaded = torch.export.load(str(tmp_path / "quantized" / "int8.pt2")).module()
    with torch.no_grad():
        out, expected = loaded(data.tensors[0][:8]), callback.int8_model(data.tensors[0][:8])
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    torch.testing.assert_close(out, expected)


def test_ptq_static_and_vit_linear(data):
    torch.manual_seed(0)
    images = [data.tensors[0][i:i + 32] for i in range(0, 64, 32)]
    cnn = timm.create_model("test_resnet", num_classes=10).eval()
    int8 = PostTrainingQuantization(layerwise=True, layerwise_steps=5).quantize(cnn, images)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=10).eval()
    vit_int8 = PostTrainingQuantization().quantize(vit, images)
    for fp, q in ((cnn, int8), (vit, vit_int8)):
        with torch.no_grad():
            ref, out = fp(images[0]), q(images[0])
        assert (ref - out).abs().max() / ref.abs().max() < 0.1
    linear = [m for m in vit_int8.modules() if isinstance(m, nn.Linear)]
    assert linear and all(type(m.weight).__name__ != "Parameter" for m in linear)  # torchao int8 weight tensors
    assert quant.model_bytes(vit_int8) < quant.model_bytes(vit) / 2.5


def test_layerwise_calibration_lowers_layer_error():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    inputs = torch.randn(256, 16)
    with torch.no_grad():
        target = layer(inputs)
        before = float((F.linear(inputs, quant.fake_quantize_weight(layer.weight, 3), layer.bias) - target).pow(2).mean()
                       / target.pow(2).mean())
    after = quant.calibrate_layer(layer, inputs, bits=3, steps=200, lr=1e-3)
    assert after < before


def test_hutchinson_trace_matches_exact_quadratic():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w = torch.randn(4, requires_grad=True)
    traces = quant.hutchinson_trace(lambda: 0.5 * (a * w * w).sum(), {"w": w}, samples=4)
    assert traces["w"] == pytest.approx(10.0)  # diagonal Hessian: v^T H v is exact for Rademacher v


def test_mixed_precision_respects_budget_and_prefers_sensitive_layers():
    torch.manual_seed(0)
    weights = {"a": torch.randn(64, 64), "b": torch.randn(64, 64), "c": torch.randn(8, 8)}
    traces = {"a": 100.0 * 4096, "b": 0.01 * 4096, "c": 1.0 * 64}
    full = sum(w.numel() * 4 for w in weights.values())
    for budget in (0.1, 0.15, 0.25):
        bits = quant.allocate_bits(traces, weights, budget * full, (2, 4, 8))
        assert sum(weights[n].numel() * b / 8 for n, b in bits.items()) <= budget * full
        assert bits["a"] >= bits["b"]
    with pytest.raises(ConfigError, match="budget"):
        quant.allocate_bits(traces, weights, 0.01 * full, (2, 4, 8))


def test_mixed_precision_callback_choose(data):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    callback = MixedPrecision(budget=0.12, samples=2)
    bits = callback.choose(model, [(data.tensors[0][:16], data.tensors[1][:16])])
    sizes = {n: model.get_submodule(n).weight.numel() for n in bits}
    assert sum(sizes[n] * b / 8 for n, b in bits.items()) <= 0.12 * 4 * sum(sizes.values())
    assert set(bits.values()) <= {2, 4, 8} and "bits" in callback.table()
    q = callback.quantized_model.get_submodule(next(iter(bits))).weight
    assert len(torch.unique(q[0])) <= 2 ** bits[next(iter(bits))]
