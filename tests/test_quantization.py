"""Quantization components and callbacks: int8 QAT/PTQ, BitNet b1.58, HAWQ mixed precision."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from callbacks.quantization import BitNet, MixedPrecision, PostTrainingQuantization, QuantizationAwareTraining
from modules.components.quant import hawq
from modules.components.quant import int8 as quant
from modules.components.quant import ternary
from modules.components.errors import ConfigError
from tests.test_callbacks import fashion_tensors, tiny_module


@pytest.fixture(scope="module")
def data():
    return fashion_tensors(128)


W_HAND = torch.tensor([[0.1, -0.5], [2.0, 0.0]])


def test_ternary_absmean_is_per_tensor_by_default_and_per_channel_as_variant():
    # per tensor: gamma = (0.1 + 0.5 + 2.0 + 0) / 4 = 0.65; W / gamma = [0.15, -0.77, 3.08, 0] -> [0, -1, 1, 0]
    torch.testing.assert_close(ternary.ternary_weight(W_HAND, ternary.AbsMean()),
                               torch.tensor([[0.0, -0.65], [0.65, 0.0]]))
    # per channel: gammas 0.3 and 1.0; rows [0.33, -1.67] -> [0, -1] and [2, 0] -> [1, 0]
    torch.testing.assert_close(ternary.ternary_weight(W_HAND, ternary.AbsMean(per_channel=True)),
                               torch.tensor([[0.0, -0.3], [1.0, 0.0]]))
    # median of |W| = {0, 0.1, 0.5, 2} (lower middle) = 0.1: W / 0.1 = [1, -5, 20, 0] -> [1, -1, 1, 0]
    torch.testing.assert_close(ternary.ternary_weight(W_HAND, ternary.AbsMedian()),
                               torch.tensor([[0.1, -0.1], [0.1, 0.0]]))
    codes, gamma = ternary.ternary_codes(W_HAND, ternary.AbsMean())
    assert codes.dtype == torch.int8 and codes.tolist() == [[0, -1], [1, 0]]
    torch.testing.assert_close(gamma.flatten(), torch.tensor([0.65]))


def test_ternary_straight_through_gradient():
    weight = torch.randn(4, 8, requires_grad=True)
    ternary.ternary_weight(weight, ternary.AbsMean()).mul(torch.arange(8.0)).sum().backward()
    torch.testing.assert_close(weight.grad, torch.arange(8.0).expand(4, 8))


def test_bitlinear_normalises_then_quantizes_per_token():
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -0.5, 0.0, 1.0], [1.0, 1.0, -1.0, 0.0]]))  # absmean 5 / 8
    layer = nn.Sequential(layer)
    assert ternary.to_bitnet(layer, skip=[]) == ["0"]
    x = torch.tensor([[1.0, -3.0, 0.5, 4.0], [2.0, 0.0, 0.0, -1.2]])
    # RMSNorm (no gain), then absmax per token: x_n * 127 / max|x_n| = x * 127 / max|x| (the norm cancels)
    # token 0: [31.75, -95.25, 15.875, 127] -> [32, -95, 16, 127]; token 1: [127, 0, 0, -76.2] -> [127, 0, 0, -76]
    rms = x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    step = (x.abs().amax(-1, keepdim=True) / rms) / 127
    x_q = torch.tensor([[32.0, -95, 16, 127], [127, 0, 0, -76]]) * step
    w_q = torch.tensor([[1.0, -1, 0, 1], [1, 1, -1, 0]]) * 0.625  # W / 0.625 = [0.8, -0.8, 0, 1.6], ...
    torch.testing.assert_close(layer(x), x_q @ w_q.t())
    torch.testing.assert_close(ternary.absmax_activation(x / rms), x_q)
    layer[0].input_norm = ternary.LayerNorm()  # variant: parameter-free LayerNorm before the quantizer
    centred = x - x.mean(-1, keepdim=True)
    normed = centred / (centred.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(layer(x), ternary.absmax_activation(normed) @ w_q.t())


def test_bitconv_treats_each_pixel_as_a_token():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False))
    ternary.to_bitnet(conv, skip=[])
    x = torch.randn(2, 3, 5, 5)
    tokens = x.permute(0, 2, 3, 1)  # (B, H, W, C): one token per pixel
    tokens = ternary.absmax_activation(tokens * torch.rsqrt(tokens.pow(2).mean(-1, keepdim=True) + 1e-6))
    w_q = ternary.ternary_weight(conv[0].weight, ternary.AbsMean()).flatten(1)
    torch.testing.assert_close(conv(x), (tokens @ w_q.t()).permute(0, 3, 1, 2))


def test_pack_ternary_is_two_bits_per_weight_and_round_trips():
    codes = torch.tensor([[-1, 0, 1], [1, 1, -1], [0, 0, 0]], dtype=torch.int8)
    packed = ternary.pack_ternary(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == 3  # 9 codes at 4 per byte
    # first byte holds codes -1, 0, 1, 1 as fields 0, 1, 2, 2 from the low bits: 0 + 4 + 32 + 128
    assert int(packed[0]) == 0b10100100
    assert torch.equal(ternary.unpack_ternary(packed, codes.shape), codes)


def test_bitnet_callback_swaps_layers_trains_and_exports_packed(tmp_path, data):
    torch.manual_seed(0)
    module = tiny_module("test_resnet")
    first = {id(p) for p in module.parameters()}
    layers = set(quant.quantizable_layers(module.backbone))
    callback = BitNet(weight_scale=ternary.AbsMedian())
    pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               default_root_dir=tmp_path, callbacks=[callback], num_sanity_val_steps=0).fit(
        module, DataLoader(data, batch_size=32))
    assert set(callback.swapped) == layers - {"conv1.0", "fc"}  # timm's stem conv and classifier stay float
    assert isinstance(module.backbone.get_submodule("conv1.3"), ternary.BitConv2d)
    assert type(module.backbone.get_submodule("conv1.0")) is nn.Conv2d and type(module.backbone.fc) is nn.Linear
    assert {id(p) for p in module.parameters()} == first
    path = tmp_path / "quantized" / "ternary.pt"
    payload = torch.load(path)
    assert callback.file_bytes == path.stat().st_size
    for name in callback.swapped:
        layer = module.backbone.get_submodule(name)
        assert payload["ternary"][name]["packed"].numel() == -(-layer.weight.numel() // 4)
    packed_bytes = sum(e["packed"].numel() + 4 * e["scale"].numel() for e in payload["ternary"].values())
    ternary_weights = sum(module.backbone.get_submodule(n).weight.numel() for n in callback.swapped)
    float_bytes = sum(v.numel() * v.element_size() for v in payload["float"].values())
    assert packed_bytes <= ternary_weights / 4 + 4 * len(callback.swapped) + 1 * len(callback.swapped)
    assert path.stat().st_size < packed_bytes + float_bytes + 40_000  # plus the zip container's overhead
    rebuilt = copy.deepcopy(module.backbone)
    with torch.no_grad():
        for p in rebuilt.parameters():
            p.zero_()
    ternary.load_ternary(rebuilt, payload)
    for name in callback.swapped:
        layer = module.backbone.get_submodule(name)
        torch.testing.assert_close(rebuilt.get_submodule(name).weight, ternary.ternary_weight(layer.weight, layer.weight_scale))
    module.eval(), rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(data.tensors[0][:8]), module.backbone(data.tensors[0][:8]))


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


class _QATRecorder(pl.Callback):
    """BatchNorm running means and fake-quant scales of the QAT graph after every training step."""

    def __init__(self):
        self.steps: list[tuple[int, dict, dict]] = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        graph = pl_module.backbone
        if isinstance(graph, torch.fx.GraphModule):
            buffers = dict(graph.named_buffers())
            stats = {k: v.clone() for k, v in buffers.items() if k.endswith("running_mean")}
            scales = {k: v.clone() for k, v in buffers.items() if k.endswith(".scale")}
            self.steps.append((trainer.global_step, stats, scales))


@pytest.fixture(scope="module")
def qat_run(data, tmp_path_factory):
    """One QAT fit shared by the tests below (each conversion re-exports torchao's ~100 conv-BN patterns, ~15 s):
    3 epochs of 4 steps, fake quantization from epoch 1 (step 4, mid-fit), so 8 QAT steps; BatchNorm statistics
    freeze after 25% of them (step 6), the observers after 75% (step 10)."""
    torch.manual_seed(0)
    module = tiny_module("test_resnet")
    float_model = copy.deepcopy(module.backbone)
    callback, recorder = QuantizationAwareTraining(start_epoch=1, freeze_bn_after=0.25, freeze_observers_after=0.75), _QATRecorder()
    loader = DataLoader(data, batch_size=32)
    root = tmp_path_factory.mktemp("qat")
    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=root, callbacks=[callback, recorder],
                         num_sanity_val_steps=0, limit_train_batches=4, limit_val_batches=1)
    trainer.fit(module, loader, loader)
    return SimpleNamespace(module=module, float_model=float_model, callback=callback, recorder=recorder,
                           trainer=trainer, root=root)


def test_int8_output_within_tolerance_of_fake_quant(qat_run, data):
    model, prepared, int8 = qat_run.float_model, qat_run.module.backbone, qat_run.callback.int8_model
    images = data.tensors[0][:32]
    prepared.eval()  # the observers are frozen (step 10): fake-quant keeps the ranges the conversion used
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


def test_qat_callback_converts_and_saves_a_loadable_program(qat_run, data):
    module, callback, trainer = qat_run.module, qat_run.callback, qat_run.trainer
    assert isinstance(module.backbone, torch.fx.GraphModule)
    # QAT began mid-fit: the optimizer trains the fake-quant graph's parameters, whichever objects export produced
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in module.backbone.parameters()} <= optimized
    assert callback.qat_start_step == 4
    assert callback.int8_model is not None and _int8_weights(callback.int8_model) > 0
    loaded = torch.export.load(str(qat_run.root / "quantized" / "int8.pt2")).module()
    with torch.no_grad():
        out, expected = loaded(data.tensors[0][:8]), callback.int8_model(data.tensors[0][:8])
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    torch.testing.assert_close(out, expected)


def test_qat_freezes_batchnorm_then_observers_for_the_final_steps(qat_run):
    callback = qat_run.callback
    assert (callback.bn_frozen_at, callback.observers_frozen_at) == (6, 10)  # QAT steps 5..12: 4 + 25% / 75% of 8
    by_step = {step: (stats, scales) for step, stats, scales in qat_run.recorder.steps}
    assert sorted(by_step) == list(range(5, 13)) and by_step[5][0] and by_step[5][1]

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert not same(by_step[5][0], by_step[6][0])  # statistics move before the freeze (step 6 trains them)
    assert all(same(by_step[6][0], by_step[s][0]) for s in range(7, 13))  # frozen, also after validation's eval()
    assert not same(by_step[9][1], by_step[10][1])  # observers still move at step 10 ...
    assert all(same(by_step[10][1], by_step[s][1]) for s in (11, 12))  # ... then their scales are fixed
    with pytest.raises(ConfigError, match="fraction"):
        QuantizationAwareTraining(freeze_bn_after=2.0)


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


def test_hutchinson_trace_stops_when_the_running_mean_settles():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w = torch.randn(4, requires_grad=True)
    traces, used = hawq.hutchinson_trace([lambda: 0.5 * (a * w * w).sum()], {"w": w})
    assert traces["w"] == pytest.approx(10.0)  # diagonal Hessian: v^T H v is exact for Rademacher v
    assert used["w"] == 2  # the second draw moves the mean by 0 < tol (the first is compared with 0)


def test_hutchinson_trace_converges_on_a_dense_hessian():
    generator = torch.Generator().manual_seed(0)
    m = torch.randn(24, 24, generator=generator, dtype=torch.float64)
    hessian = m @ m.t() / 24
    w = torch.randn(24, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)  # a second block with an exact (diagonal) Hessian
    loss = lambda: 0.5 * w @ hessian @ w + (b * b).sum()  # noqa: E731
    traces, used = hawq.hutchinson_trace([loss], {"w": w, "b": b}, tol=1e-3, max_samples=400,
                                         generator=torch.Generator().manual_seed(1))
    off_diagonal = hessian - torch.diag(torch.diag(hessian))
    sigma = float((2 * off_diagonal.pow(2).sum()).sqrt())  # std of one Rademacher draw of v^T H v
    exact = float(torch.trace(hessian))
    assert used["w"] > 8 and used["b"] == 2  # blocks stop on their own criterion
    assert abs(traces["w"] - exact) <= 4 * sigma / used["w"] ** 0.5
    assert traces["b"] == pytest.approx(16.0)


def _random_instance(generator: torch.Generator):
    layers = int(torch.randint(2, 6, (1,), generator=generator))
    weights = {f"l{i}": torch.randn(int(torch.randint(2, 33, (1,), generator=generator)),
                                    int(torch.randint(2, 17, (1,), generator=generator)), generator=generator)
               for i in range(layers)}
    traces = {n: float(torch.rand(1, generator=generator) * 10 ** float(torch.randint(-2, 3, (1,), generator=generator)))
              * w.numel() for n, w in weights.items()}
    low, high = (sum(w.numel() * b / 8 for w in weights.values()) for b in (2, 8))
    budget = low + float(torch.rand(1, generator=generator)) * (high - low)
    return weights, traces, budget


def test_allocate_bits_is_optimal_against_brute_force():
    import itertools

    generator = torch.Generator().manual_seed(0)
    choices = (2, 4, 8)
    for _ in range(120):
        weights, traces, budget = _random_instance(generator)
        costs = hawq.sensitivities(traces, weights, choices)
        best = min(sum(costs[n][b] for n, b in zip(weights, combo))
                   for combo in itertools.product(choices, repeat=len(weights))
                   if sum(weights[n].numel() * b for n, b in zip(weights, combo)) <= int(budget * 8))
        bits = hawq.allocate_bits(traces, weights, budget, choices)
        assert sum(weights[n].numel() * b for n, b in bits.items()) <= budget * 8
        assert sum(costs[n][b] for n, b in bits.items()) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_allocate_bits_fixed_layers_keep_their_bits_and_use_the_budget():
    torch.manual_seed(0)
    weights = {"stem": torch.randn(16, 27), "a": torch.randn(64, 64), "b": torch.randn(64, 64), "head": torch.randn(10, 64)}
    traces = {"a": 100.0 * 4096, "b": 0.01 * 4096}
    fixed = {"stem": 8, "head": 8}
    fixed_bytes = (16 * 27 + 10 * 64) * 8 / 8
    budget = fixed_bytes + 4096 * (8 + 2) / 8  # room for a at 8 bits and b at 2 bits, nothing more
    bits = hawq.allocate_bits(traces, weights, budget, (2, 4, 8), fixed)
    assert bits == {"stem": 8, "a": 8, "b": 2, "head": 8}
    with pytest.raises(ConfigError, match="budget"):
        hawq.allocate_bits(traces, weights, fixed_bytes + 4096 * 3 / 8, (2, 4, 8), fixed)


def test_mixed_precision_callback_pins_stem_and_head_at_8_bits(data):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    callback = MixedPrecision(budget=0.12, max_samples=3)
    bits = callback.choose(model, [(data.tensors[0][:8], data.tensors[1][:8])])
    assert bits["conv1.0"] == 8 and bits["fc"] == 8  # HAWQ-V3: first conv and classifier at 8 bits
    assert callback.traces["fc"] is None and set(callback.samples) == set(bits) - {"conv1.0", "fc"}
    sizes = {n: model.get_submodule(n).weight.numel() for n in bits}
    assert sum(sizes[n] * b / 8 for n, b in bits.items()) <= 0.12 * 4 * sum(sizes.values())
    assert set(bits.values()) <= {2, 4, 8} and "bits" in callback.table()
    name = next(n for n, b in bits.items() if b == 2)
    assert len(torch.unique(callback.quantized_model.get_submodule(name).weight[0])) <= 4
