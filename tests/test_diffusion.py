"""Diffusion: schedules, q_sample, oracle denoiser, DDIM vs DDPM, guidance, DiffFit, TD-LN, evaluation, CLI, sample tool."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from modules.components.backbones import create_backbone
from modules.components.diffusion import (
    NoiseSchedule,
    ddim_sample,
    ddim_timesteps,
    ddpm_sample,
    guided_eps,
    make_betas,
    predict_x0,
    q_sample,
)
from modules.components.dimr import DiMR, TDLayerNorm
from modules.components.dit import DiT, DiTBlock, difffit_parameter_names
from modules.components.errors import ConfigError
from modules.components.frechet import FeatureClassifier, load_feature_classifier
from modules.components.optim import OptimConfig, build_optimizer
from modules.diffusion import DiffusionModule
from tests.conftest import cli_args

TINY = dict(patch_size=8, dim=32, depth=2, heads=2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message="DiffFit on a randomly")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny sampler ops: thread hand-offs dominate on a shared CPU
    yield
    torch.set_num_threads(threads)


def build(architecture: str = "dit", **kwargs) -> DiffusionModule:
    kwargs.setdefault("denoiser_kwargs", TINY)
    return DiffusionModule(architecture, num_classes=3, image_size=32, timesteps=100, **kwargs)


def randomize(module: nn.Module) -> nn.Module:
    """Perturb every weight (adaLN-zero makes a fresh DiT output exactly 0, hiding conditioning bugs)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module


# --- schedules and q_sample -------------------------------------------------------------------------
def test_linear_schedule_endpoints_and_monotone():
    schedule = NoiseSchedule("linear", 1000)
    assert schedule.betas[0].item() == pytest.approx(1e-4) and schedule.betas[-1].item() == pytest.approx(0.02)
    ab = schedule.alphas_cumprod.double()
    assert (ab[1:] < ab[:-1]).all()
    assert ab[0].item() == pytest.approx(1 - 1e-4)
    expected_last = math.prod(1 - (1e-4 + (0.02 - 1e-4) * i / 999) for i in range(1000))
    assert ab[-1].item() == pytest.approx(expected_last, rel=1e-3)  # ~4.0e-5: x_T is almost pure noise


def test_cosine_schedule_endpoints_and_monotone():
    ab = NoiseSchedule("cosine", 1000).alphas_cumprod.double()
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert (ab[1:] < ab[:-1]).all() and ab[-1] >= 0
    assert ab[0].item() == pytest.approx(f(1) / f(0), rel=1e-6)
    assert ab[499].item() == pytest.approx(f(500) / f(0), rel=1e-4)
    assert ab[-1].item() < 1e-6
    with pytest.raises(ConfigError, match="linear, cosine"):
        make_betas("quadratic", 10)


def test_q_sample_statistics():
    schedule = NoiseSchedule("linear", 1000)
    x0 = torch.full((200_000,), 0.7)
    for step in (0, 300, 999):
        t = torch.full((1,), step)
        x_t = q_sample(x0, t.expand(x0.shape[0]), torch.randn_like(x0), schedule)
        ab = schedule.alphas_cumprod[step].item()
        assert x_t.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=6e-3)
        assert x_t.std().item() == pytest.approx(math.sqrt(1 - ab), rel=1e-2, abs=1e-4)


def test_ddim_timesteps_cover_the_range():
    assert ddim_timesteps(1000, 1000) == list(range(999, -1, -1))
    assert ddim_timesteps(1000, 10) == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert ddim_timesteps(100, 3) == [66, 33, 0]
    with pytest.raises(ConfigError):
        ddim_timesteps(100, 0)


# --- oracle denoiser and samplers --------------------------------------------------------------------
class Oracle(nn.Module):
    """Knows x0, so it returns the exact noise of any x_t: eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)."""

    def __init__(self, x0: torch.Tensor, schedule: NoiseSchedule):
        super().__init__()
        self.x0, self.schedule = x0, schedule

    def forward(self, x_t, t, labels):
        ab = self.schedule.alpha_bar(t, x_t.ndim)
        x0 = self.x0.repeat(x_t.shape[0] // len(self.x0), 1, 1, 1)  # guidance batches (cond, uncond) together
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()


def test_oracle_denoiser_has_zero_loss_and_samples_recover_x0():
    model = build(ema_decay=0, clip_denoised=False)
    x0 = torch.rand(6, 3, 32, 32) * 2 - 1
    model.denoiser = Oracle(x0, model.schedule)
    assert model.diffusion_loss(x0, torch.zeros(6, dtype=torch.long)).item() < 1e-8
    t = torch.full((6,), 40)
    noise = torch.randn_like(x0)
    assert torch.allclose(predict_x0(q_sample(x0, t, noise, model.schedule), t, noise, model.schedule), x0, atol=1e-5)
    for steps in (1, 10):  # deterministic DDIM lands on x0 for any step count and guidance scale
        samples = model.sample(torch.zeros(6, dtype=torch.long), steps=steps, guidance_scale=3.0)
        assert torch.allclose(samples, x0, atol=1e-3)


def test_ddim_1000_steps_eta_1_matches_ddpm_on_a_gaussian():
    """Data N(mu, s^2): the exact eps predictor is known; both samplers must give N(mu, s^2) back."""
    schedule = NoiseSchedule("linear", 1000)
    mu, s = 1.5, 0.5

    def eps_fn(x, t):
        ab = schedule.alpha_bar(t, x.ndim)
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * s**2 + 1 - ab)

    noise = torch.randn(5_000, 1)
    ddpm = ddpm_sample(eps_fn, noise, schedule, generator=torch.Generator().manual_seed(1))
    ddim = ddim_sample(eps_fn, noise, schedule, steps=1000, eta=1.0, generator=torch.Generator().manual_seed(2))
    for samples in (ddpm, ddim):
        assert samples.mean().item() == pytest.approx(mu, abs=0.02)
        assert samples.std().item() == pytest.approx(s, abs=0.02)
    assert abs(ddpm.std() - ddim.std()).item() < 0.02
    same_noise = ddim_sample(eps_fn, noise, schedule, steps=1000, eta=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(same_noise, ddpm, atol=1e-3)  # identical update rule, not just identical statistics
    deterministic = ddim_sample(eps_fn, noise, schedule, steps=50, eta=0.0)  # coarse steps: some discretisation error
    assert deterministic.mean().item() == pytest.approx(mu, abs=0.02)
    assert deterministic.std().item() == pytest.approx(s, abs=0.05)


@pytest.mark.parametrize("architecture", ["dit", "dimr"])
def test_guidance_scale_0_is_unconditional_and_1_conditional(architecture):
    net = randomize(build(architecture).denoiser).eval()
    x, t, labels = torch.randn(4, 3, 32, 32), torch.tensor([5, 20, 50, 99]), torch.tensor([0, 1, 2, 1])
    null = torch.full_like(labels, 3)
    conditional, unconditional = net(x, t, labels), net(x, t, null)
    assert not torch.allclose(conditional, unconditional, atol=1e-4)  # the label matters
    assert torch.allclose(guided_eps(net, labels, 3, 0.0)(x, t), unconditional)
    assert torch.allclose(guided_eps(net, labels, 3, 1.0)(x, t), conditional)
    guided = guided_eps(net, labels, 3, 2.5)(x, t)
    assert torch.allclose(guided, unconditional + 2.5 * (conditional - unconditional), atol=1e-4)


# --- architectures -----------------------------------------------------------------------------------
def test_dit_blocks_start_as_identity_and_shapes_round_trip():
    block = DiTBlock(32, 2)
    x, cond = torch.randn(2, 16, 32), torch.randn(2, 32)
    assert torch.equal(block(x, cond), x)  # adaLN-zero
    net = DiT(input_size=32, in_channels=3, num_classes=3, **TINY)
    assert net(torch.randn(2, 3, 32, 32), torch.tensor([0, 9]), torch.tensor([0, 3])).shape == (2, 3, 32, 32)


def test_td_layernorm_depends_on_t_and_trains_both_endpoints():
    norm = TDLayerNorm(16, timesteps=1000)
    x = torch.randn(1, 5, 16).expand(3, 5, 16)
    out = norm(x, torch.tensor([0, 500, 999]))
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])
    plain = nn.functional.layer_norm(x[0], (16,), eps=1e-6)
    assert (out[0] - plain).abs().mean() < 0.05  # near a plain LayerNorm at init
    out.square().sum().backward()
    assert norm.scales.grad.abs().min() > 0 and norm.shifts.grad.abs().min() > 0 and norm.time_weight.grad != 0


def test_dimr_output_depends_on_t_and_label():
    net = randomize(DiMR(input_size=32, in_channels=3, num_classes=3, **TINY, timesteps=100)).eval()
    x = torch.randn(1, 3, 32, 32).expand(2, 3, 32, 32)
    assert net(x, torch.tensor([1, 1]), torch.tensor([0, 1])).shape == (2, 3, 32, 32)
    by_label = net(x, torch.tensor([1, 1]), torch.tensor([0, 1]))
    by_time = net(x, torch.tensor([1, 90]), torch.tensor([0, 0]))
    assert not torch.allclose(by_label[0], by_label[1]) and not torch.allclose(by_time[0], by_time[1])
    with pytest.raises(ConfigError, match="power of 2"):
        DiMR(input_size=32, patch_size=6)


# --- DiffFit ------------------------------------------------------------------------------------------
def test_difffit_trains_exactly_biases_norms_class_embedding_and_gammas(tmp_path):
    pretrained = build()
    randomize(pretrained.denoiser)
    path = tmp_path / "pretrained.ckpt"
    torch.save({"state_dict": pretrained.state_dict()}, path)
    model = build(method="difffit", init_checkpoint=str(path))
    expected = {n for n, _ in model.denoiser.named_parameters()
                if n.endswith(".bias") or n.split(".")[-1] in ("gamma_attn", "gamma_mlp") or n == "y_embedder.weight"}
    trainable = {n for n, p in model.denoiser.named_parameters() if p.requires_grad}
    assert trainable == expected and len(expected) == 3 + 1 + 2 * (2 + 5) + 2  # embedders, y, 2 blocks x (gammas, biases), final
    assert set(difffit_parameter_names(model.denoiser)) == expected
    optimizer = build_optimizer(model.optimizer_root(), OptimConfig())
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        model.denoiser.get_parameter(n).numel() for n in expected)
    assert model.trainable_percent() < 5
    # pretrained weights loaded (EMA copy preferred), new gammas at 1: the same function as the pretrained model
    assert all(model.denoiser.get_parameter(f"blocks.{i}.gamma_mlp").item() == 1 for i in range(2))
    x, t, labels = torch.randn(2, 3, 32, 32), torch.tensor([3, 70]), torch.tensor([0, 2])
    assert torch.allclose(model.denoiser(x, t, labels), pretrained.ema.module(x, t, labels), atol=1e-6)


def test_difffit_rejects_a_checkpoint_of_another_architecture(tmp_path):
    path = tmp_path / "dimr.ckpt"
    torch.save({"state_dict": build("dimr").state_dict()}, path)
    with pytest.raises(ConfigError, match="architecture"):
        build(method="difffit", init_checkpoint=str(path))
    torch.save({"state_dict": {"backbone.fc.weight": torch.zeros(1)}}, path)
    with pytest.raises(ConfigError, match="not a diffusion checkpoint"):
        build(method="difffit", init_checkpoint=str(path))


def test_bad_options_raise_config_errors():
    with pytest.raises(ConfigError, match="dit, dimr"):
        build("unet")
    with pytest.raises(ConfigError, match="full, difffit"):
        build(method="lora")
    with pytest.raises(ConfigError, match="classifier_classes"):
        build(classifier_classes=[5, 6])
    with pytest.raises(ConfigError, match="does not exist"):
        build(feature_classifier="missing.ckpt")


# --- evaluation ---------------------------------------------------------------------------------------
def test_frechet_distance_is_zero_on_identical_sets_and_accuracy_uses_the_class_map(tmp_path):
    backbone = create_backbone("test_resnet", num_classes=8)
    path = tmp_path / "classifier.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in backbone.state_dict().items()},
                "hyper_parameters": {"backbone": "test_resnet", "num_classes": 8, "image_size": 32}}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build(feature_classifier=str(path), classifier_classes=[5, 6, 7])
    classifier = model.frechet.inception
    assert isinstance(classifier, FeatureClassifier) and "frechet" not in dict(model.named_children())
    real = torch.rand(64, 3, 32, 32) * 2 - 1
    model.frechet.update(real, real=True)
    same = model.evaluate(real, torch.zeros(64, dtype=torch.long))
    assert abs(same["val/fd_classifier"]) < 1e-3
    model.frechet.update(real, real=True)
    shifted = model.evaluate((real * 0.3 + 0.5).clamp(-1, 1), torch.zeros(64, dtype=torch.long))
    assert shifted["val/fd_classifier"] > 1e-2
    predicted = classifier.logits(real).argmax(-1)
    labels = torch.tensor([1] * 64)  # label 1 here is class 6 of the classifier
    model.frechet.update(real, real=True)
    assert model.evaluate(real, labels)["val/sample_acc"] == pytest.approx((predicted == 6).float().mean().item())
    torch.save({"state_dict": {}, "hyper_parameters": {"architecture": "dit"}}, path)
    with pytest.raises(ConfigError, match="not a ClassificationModule"):
        load_feature_classifier(path)


# --- CLI and the sample tool --------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_fit_with_feature_classifier_then_sample_tool(run_cli, tmp_path, beton_cache, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from app.cli import main as cli_main

    classifier_dir = tmp_path / "classifier"
    assert run_cli(cli_args(classifier_dir, beton_cache)) == 0
    classifier = classifier_dir / "checkpoints" / "last.ckpt"
    run = tmp_path / "diffusion"
    args = cli_args(run, beton_cache, "--model.init_args.feature_classifier", str(classifier),
                    "--checkpoint.monitor", "val/fd_classifier", model="diffusion/debug.yaml")
    assert run_cli(args) == 0
    assert list((run / "checkpoints").glob("epoch*.ckpt"))  # monitoring val/fd_classifier worked: it was logged
    events = EventAccumulator(str(next(run.rglob("events.out.tfevents*")).parent), size_guidance={"images": 0}).Reload()
    assert {"val/fd_classifier", "val/sample_acc", "val/loss", "train/loss"} <= set(events.Tags()["scalars"])
    assert "diffusion/samples" in events.Tags()["images"]

    out = tmp_path / "samples"
    cli_main(["sample", "--checkpoint", str(run / "checkpoints" / "last.ckpt"), "--per-class", "2", "--steps", "2",
              "--out", str(out)])
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert pngs == [f"{c}/{c}_{i:05d}.png" for c in range(10) for i in range(2)]
    assert not list(out.rglob(".*tmp*"))
    with pytest.raises(SystemExit):
        cli_main(["sample", "--checkpoint", str(classifier), "--out", str(out)])


def test_cli_debug_config_fast_dev_run(run_cli, tmp_path, beton_cache):
    assert run_cli(cli_args(tmp_path, beton_cache, "--trainer.fast_dev_run", "true", model="diffusion/debug.yaml")) == 0
