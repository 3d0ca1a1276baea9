"""Diffusion: schedules, q_sample, oracle denoiser, DDIM vs DDPM, guidance, DiffFit, TD-LN, evaluation, CLI, sample tool."""

from __future__ import annotations

import math
import warnings
from functools import partial

import pytest
import torch
from torch import nn

from modules.components.backbones import create_backbone
from modules.components.diffusion.gaussian import (
    NoiseSchedule,
    ddim_sample,
    ddim_timesteps,
    ddpm_sample,
    guided_eps,
    make_betas,
    predict_x0,
    q_sample,
    vlb_terms,
)
from modules.components.diffusion.difffit import DiffFit
from modules.components.diffusion.dimr import DiMR, TDLayerNorm, time_condition
from modules.components.diffusion.dit import DiT, DiTBlock, modulate
from modules.components.errors import ConfigError
from modules.components.diffusion.frechet import FeatureClassifier, load_feature_classifier
from modules.components.optim import OptimConfig, build_optimizer
from modules.diffusion import DiffusionModule
from tests.conftest import CONFIGS, cli_args

TINY = dict(patch_size=8, dim=32, depth=2, heads=2)
ARCHITECTURES = {"dit": DiT, "dimr": partial(DiMR, timesteps=100)}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message="DiffFit on a randomly")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny sampler ops: thread hand-offs dominate on a shared CPU
    yield
    torch.set_num_threads(threads)


def build(architecture: str = "dit", denoiser_kwargs: dict | None = None, **kwargs) -> DiffusionModule:
    factory = partial(ARCHITECTURES[architecture], **(denoiser_kwargs or TINY))
    return DiffusionModule(factory, num_classes=3, image_size=32, timesteps=100, **kwargs)


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


def test_linear_schedule_rescaled_to_few_steps_stays_below_one():
    betas = make_betas("linear", 40)  # improved DDPM's rescaling: 1000 / T x (1e-4 .. 0.02)
    assert betas[0].item() == pytest.approx(25 * 1e-4) and betas[-1].item() == pytest.approx(0.5)
    assert make_betas("linear", 21)[-1].item() == pytest.approx(20 / 21)
    for steps in (20, 10):  # beta_T = 20 / T >= 1: alpha_bar_T = 0, log-SNR -inf
        with pytest.raises(ConfigError, match="timesteps > 20"):
            make_betas("linear", steps)
    with pytest.raises(ConfigError, match="timesteps >= 1"):
        make_betas("cosine", 0)


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
    model = build(denoiser_kwargs={**TINY, "learn_sigma": False}, ema_decay=0, clip_denoised=False)
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
    model = build(architecture, denoiser_kwargs={**TINY, "learn_sigma": False} if architecture == "dit" else None)
    net = model._highest_resolution(randomize(model.denoiser).eval())
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
    net = DiT(input_size=32, in_channels=3, num_classes=3, **TINY, learn_sigma=False)
    assert net(torch.randn(2, 3, 32, 32), torch.tensor([0, 9]), torch.tensor([0, 3])).shape == (2, 3, 32, 32)


def test_bad_options_raise_config_errors():
    with pytest.raises(ConfigError, match="classifier_classes"):
        build(classifier_classes=[5, 6])
    with pytest.raises(ConfigError, match="does not exist"):
        build(feature_classifier="missing.ckpt")
    with pytest.raises(ConfigError, match="schedule"):  # DiMR's TD-LN reads t / T (or the schedule's log-SNR)
        DiffusionModule(partial(DiMR, **TINY, timesteps=1000), num_classes=3, image_size=32, timesteps=100)
    with pytest.raises(ConfigError, match="DiT denoiser"):
        build("dimr", finetune=DiffFit())
    with pytest.raises(ConfigError, match="first_block"):
        build(finetune=DiffFit(first_block=2, last_block=1))


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
    assert isinstance(classifier, FeatureClassifier)
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
    ddpm_out = tmp_path / "ddpm"  # ancestral sampling over all T steps with the learned variance
    cli_main(["sample", "--checkpoint", str(run / "checkpoints" / "last.ckpt"), "--per-class", "1", "--ddpm",
              "--out", str(ddpm_out)])
    assert len(list(ddpm_out.rglob("*.png"))) == 10
    with pytest.raises(SystemExit):
        cli_main(["sample", "--checkpoint", str(classifier), "--out", str(out)])


def test_cli_debug_config_fast_dev_run(run_cli, tmp_path, beton_cache):
    assert run_cli(cli_args(tmp_path, beton_cache, "--trainer.fast_dev_run", "true", model="diffusion/debug.yaml")) == 0


# --- learned variance (improved DDPM, DiT's default) --------------------------------------------------
def test_dit_learns_sigma_by_default_with_2c_output_channels():
    x, t, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 9]), torch.tensor([0, 3])
    assert DiT(32, 3, 3, **TINY)(x, t, labels).shape == (2, 6, 32, 32)
    assert DiT(32, 3, 3, **TINY, learn_sigma=False)(x, t, labels).shape == (2, 3, 32, 32)
    assert build().learn_sigma and not build(denoiser_kwargs={**TINY, "learn_sigma": False}).learn_sigma


def _cdf(x: float) -> float:
    return 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))  # improved DDPM's approximation


def test_vlb_term_matches_hand_computed_gaussian_kl_and_discretised_decoder_nll():
    schedule = NoiseSchedule("linear", 100)
    betas = [1000 / 100 * (1e-4 + (0.02 - 1e-4) * i / 99) for i in range(100)]
    ab = [math.prod(1 - b for b in betas[: i + 1]) for i in range(100)]
    x0 = torch.tensor([0.3, -1.0, 1.0, -0.2]).view(1, 1, 2, 2)
    eps = torch.tensor([0.2, -0.4, 0.6, -1.1]).view(1, 1, 2, 2)
    values = torch.tensor([-1.0, -0.2, 0.5, 1.0]).view(1, 1, 2, 2)
    for step in (0, 37):
        # x_t drawn with a noise near eps, so the predicted mean lands within a few bins of x0 at t = 0
        true_noise = eps + torch.tensor([0.3, -0.5, 0.2, 0.4]).view(1, 1, 2, 2)
        x_t = math.sqrt(ab[step]) * x0 + math.sqrt(1 - ab[step]) * true_noise
        previous = ab[step - 1] if step > 0 else 1.0
        tilde = [betas[i] * (1 - (ab[i - 1] if i else 1.0)) / (1 - ab[i]) for i in range(100)]
        log_tilde = math.log(tilde[max(step, 1)])  # clipped at t=0 to beta_tilde_1
        coef1, coef2 = betas[step] * math.sqrt(previous) / (1 - ab[step]), (1 - previous) * math.sqrt(1 - betas[step]) / (1 - ab[step])
        total = 0.0
        for a, x, e, v in zip(x0.flatten().tolist(), x_t.flatten().tolist(), eps.flatten().tolist(), values.flatten().tolist()):
            frac = (v + 1) / 2
            log_var = frac * math.log(betas[step]) + (1 - frac) * log_tilde
            pred_x0 = (x - math.sqrt(1 - ab[step]) * e) / math.sqrt(ab[step])
            mean, true_mean = coef1 * pred_x0 + coef2 * x, coef1 * a + coef2 * x
            if step > 0:
                total += 0.5 * (-1 + log_var - log_tilde + math.exp(log_tilde - log_var) + (true_mean - mean) ** 2 / math.exp(log_var))
            else:
                std = math.exp(0.5 * log_var)
                upper, lower = _cdf((a - mean + 1 / 255) / std), _cdf((a - mean - 1 / 255) / std)
                total -= math.log(max(upper if a < -0.999 else 1 - lower if a > 0.999 else upper - lower, 1e-12))
        expected = total / 4 / math.log(2)  # mean over the 4 elements, in bits
        got = vlb_terms(schedule, x0, x_t, torch.tensor([step]), eps, values)
        assert got.shape == (1,) and got.item() == pytest.approx(expected, rel=1e-4)


class OutputParameter(nn.Module):
    """A denoiser whose output is a free parameter: gradients show which loss term reaches which channels."""

    learn_sigma = True

    def __init__(self, shape):
        super().__init__()
        self.out = nn.Parameter(0.3 * torch.randn(shape))

    def forward(self, x, t, labels):
        return self.out


def test_hybrid_loss_is_mse_plus_vb_and_vb_trains_only_the_variance():
    model = build(ema_decay=0)
    model.denoiser = OutputParameter((4, 6, 32, 32))
    x0, labels = torch.rand(4, 3, 32, 32) * 2 - 1, torch.zeros(4, dtype=torch.long)
    losses = model.diffusion_losses(x0, labels, torch.Generator().manual_seed(0))
    assert losses["loss"].item() == pytest.approx((losses["mse"] + losses["vb"]).item(), rel=1e-6)
    losses["vb"].backward()
    grad = model.denoiser.out.grad
    assert grad[:, :3].abs().max() == 0 and grad[:, 3:].abs().mean() > 0  # stop-gradient on the mean
    model.denoiser.out.grad = None
    model.diffusion_losses(x0, labels, torch.Generator().manual_seed(0))["mse"].backward()
    assert model.denoiser.out.grad[:, 3:].abs().max() == 0


@pytest.mark.parametrize("value", [1.0, -1.0, None])
def test_ddpm_sampling_uses_the_learned_variance(value):
    """eps = 0: x_{t-1} = a_t x_t + sigma_t z, so Var(x_0) follows by hand from sigma_t^2 = beta_t (v=1) or
    beta_tilde_t (v=-1, and the fixed variance)."""
    schedule = NoiseSchedule("linear", 100)
    betas = [1000 / 100 * (1e-4 + (0.02 - 1e-4) * i / 99) for i in range(100)]
    ab = [math.prod(1 - b for b in betas[: i + 1]) for i in range(100)]
    variance = 1.0
    for step in reversed(range(100)):
        previous = ab[step - 1] if step else 1.0
        coef1, coef2 = betas[step] * math.sqrt(previous) / (1 - ab[step]), (1 - previous) * math.sqrt(1 - betas[step]) / (1 - ab[step])
        gain = coef1 / math.sqrt(ab[step]) + coef2
        sigma2 = 0.0 if step == 0 else betas[step] if value == 1.0 else betas[step] * (1 - previous) / (1 - ab[step])
        variance = gain**2 * variance + sigma2

    def output(x, t):
        zeros = torch.zeros_like(x)
        return zeros if value is None else torch.cat([zeros, torch.full_like(x, value)], dim=1)

    noise = torch.randn(40_000, 1)
    samples = ddpm_sample(output, noise, schedule, torch.Generator().manual_seed(3), learn_sigma=value is not None)
    assert samples.var().item() == pytest.approx(variance, rel=0.03)  # sampling error of a variance: ~0.7%


def test_guidance_applies_to_the_noise_channels_only():
    def net(x, t, labels):  # eps = label, variance values = label / 10
        level = labels.float().view(-1, 1, 1, 1).expand(-1, 3, 2, 2)
        return torch.cat([level, level / 10], dim=1)

    guided = guided_eps(net, torch.tensor([2, 1]), null_label=3, guidance_scale=4.0, learn_sigma=True)
    out = guided(torch.zeros(2, 3, 2, 2), torch.zeros(2, dtype=torch.long))
    assert torch.allclose(out[:, :3, 0, 0], torch.tensor([[3 + 4 * (2 - 3.0)] * 3, [3 + 4 * (1 - 3.0)] * 3]))
    assert torch.allclose(out[:, 3:, 0, 0], torch.tensor([[0.2] * 3, [0.1] * 3]))  # the conditional variance


# --- initialisation and the ImageNet-style recipe -----------------------------------------------------
def test_dit_initialisation_as_the_reference():
    net = DiT(32, 3, 10, patch_size=4, dim=64, depth=2, heads=4)
    qkv = net.blocks[0].attn.qkv
    bound = math.sqrt(6 / (64 + 192))  # Xavier-uniform
    assert qkv.weight.abs().max() <= bound and qkv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert all(m.bias.abs().max() == 0 for m in net.modules() if isinstance(m, nn.Linear))
    proj = net.x_embedder.proj.weight  # Xavier on the (out, in * p * p) view
    patch_bound = math.sqrt(6 / (64 + 3 * 16))
    assert proj.abs().max() <= patch_bound and proj.std().item() == pytest.approx(patch_bound / math.sqrt(3), rel=0.05)
    for layer in (net.t_embedder.mlp.fc1, net.t_embedder.mlp.fc2):
        assert layer.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert net.final_layer.linear.weight.abs().max() == 0 and net.blocks[1].adaLN_modulation[1].weight.abs().max() == 0


def test_imagenet_config_has_the_reference_long_run_defaults():
    import yaml

    config = yaml.safe_load((CONFIGS / "diffusion" / "imagenet.yaml").read_text())
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    assert model["ema_decay"] == 0.9999 and model["denoiser"]["init_args"]["learn_sigma"] is True
    optim = model["optim"]
    assert (optim["name"], optim["lr"], optim["weight_decay"], optim["warmup_epochs"], optim["min_lr_ratio"]) == (
        "adamw", 1e-4, 0.0, 0, 1.0)  # constant AdamW 1e-4
    assert data["hflip"] is True and model["label_dropout"] == 0.1


@pytest.mark.parametrize("config", sorted(p.name for p in (CONFIGS / "diffusion").glob("*.yaml")))
def test_every_diffusion_config_instantiates(config, tmp_path, beton_cache, diffusion_checkpoints):
    from lightning.pytorch import LightningDataModule, LightningModule

    from app.cli import VisionlabCLI

    text = (CONFIGS / "diffusion" / config).read_text()
    args = cli_args(tmp_path, beton_cache, model=f"diffusion/{config}")[1:]
    args += ["--data.init_args.train_limit", "64", "--data.init_args.val_limit", "64"]
    classifier, pretrained = diffusion_checkpoints
    if "feature_classifier:" in text:
        args += ["--model.init_args.feature_classifier", str(classifier)]
    if "init_checkpoint:" in text:
        args += ["--model.init_args.init_checkpoint", str(pretrained)]
    cli = VisionlabCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       run=False, args=args)
    assert isinstance(cli.model, DiffusionModule)
    if "DiffFit" in text:
        assert 0 < cli.model.trainable_percent() < 5


@pytest.fixture(scope="module")
def diffusion_checkpoints(tmp_path_factory):
    """A 10-class feature classifier and a DiT pretrained on 5 classes in the configs' denoiser shape."""
    root = tmp_path_factory.mktemp("diffusion_checkpoints")
    backbone = create_backbone("test_resnet", num_classes=10)
    classifier = root / "classifier.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in backbone.state_dict().items()},
                "hyper_parameters": {"backbone": "test_resnet", "num_classes": 10, "image_size": 32},
                "datamodule_hyper_parameters": {"mean": (0.5,) * 3, "std": (0.5,) * 3}}, classifier)
    pretrained = root / "dit.ckpt"
    model = DiffusionModule(partial(DiT, patch_size=4, dim=192, depth=6, heads=6), num_classes=5, image_size=32, ema_decay=0)
    torch.save({"state_dict": model.state_dict()}, pretrained)
    return classifier, pretrained


def test_frechet_network_moves_with_the_module_and_stays_out_of_the_checkpoint(diffusion_checkpoints):
    classifier, _ = diffusion_checkpoints
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build(feature_classifier=str(classifier))
    assert model.frechet is dict(model.named_children())["frechet_metric"].module  # a child: .to(device) moves it
    model.to(torch.float64)
    assert next(model.frechet.inception.parameters()).dtype == torch.float64
    assert not any(p.requires_grad for p in model.frechet.parameters())
    model.train()
    assert not model.frechet.inception.training  # frozen: eval mode whatever the owner's mode
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and not any(k.startswith("frechet") for k in checkpoint["state_dict"])
    model.on_load_checkpoint(checkpoint)  # resuming with a feature classifier: its weights are filled back in
    model.load_state_dict(checkpoint["state_dict"], strict=True)


# --- the latent autoencoder hook ----------------------------------------------------------------------
class TinyAutoencoder(nn.Module):
    """16 px RGB <-> 4 x 8 x 8 latents; the hook's four members."""

    latent_channels, downsample = 4, 2

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 4, 2, stride=2))
        self.decoder = nn.Sequential(nn.ConvTranspose2d(4, 16, 2, stride=2), nn.SiLU(), nn.Conv2d(16, 3, 3, padding=1))

    def encode(self, images):
        return self.encoder(images)

    def decode(self, latents):
        return self.decoder(latents)


def fashion_mnist_16px(count: int) -> torch.Tensor:
    """Real Fashion-MNIST test images as (count, 3, 16, 16) in [-1, 1]."""
    import gzip

    import numpy as np

    with gzip.open("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz") as f:
        pixels = np.frombuffer(f.read(), dtype=np.uint8, offset=16)[: count * 784].reshape(count, 1, 28, 28)
    images = torch.from_numpy(pixels.copy()).float() / 127.5 - 1
    return nn.functional.interpolate(images, size=16, mode="area").expand(-1, 3, -1, -1).contiguous()


def test_autoencoder_hook_with_latent_scale_on_a_trained_autoencoder():
    images = fashion_mnist_16px(512)
    autoencoder = TinyAutoencoder()
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=3e-3)
    for step in range(150):
        batch = images[(step * 64) % 512:(step * 64) % 512 + 64]
        loss = (autoencoder.decode(autoencoder.encode(batch)) - batch).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        latents = autoencoder.encode(images)
        reconstruction_error = (autoencoder.decode(latents) - images).square().mean().item()
    assert reconstruction_error < 0.05 * images.var().item() + 0.02  # it learned to reconstruct
    scale = 1 / latents.std().item()  # as 0.18215 is ~1/std of SD-VAE latents
    model = DiffusionModule(partial(DiT, patch_size=2, dim=32, depth=2, heads=2), num_classes=10, image_size=16,
                            timesteps=100, autoencoder=autoencoder, latent_scale=scale, ema_decay=0)
    assert model.denoiser.x_embedder.img_size == (8, 8) and model.denoiser.in_channels == 4
    with torch.no_grad():
        scaled = model.encode(images)
        assert scaled.std().item() == pytest.approx(1.0, rel=1e-4)
        assert torch.allclose(model.decode(scaled), autoencoder.decode(latents), atol=1e-5)
        labels = torch.zeros(8, dtype=torch.long)
        expected = model.diffusion_loss(latents[:8] * scale, labels, torch.Generator().manual_seed(1))
        assert model.diffusion_loss(model.encode(images[:8]), labels, torch.Generator().manual_seed(1)) == expected
        samples = model.sample(labels, steps=2)
    assert samples.shape == (8, 3, 16, 16)
    assert not any(p.requires_grad for p in model.autoencoder.parameters())


# --- DiffFit ------------------------------------------------------------------------------------------
def test_difffit_per_channel_scales_in_the_first_half_and_the_trainable_set(tmp_path):
    kwargs = {**TINY, "depth": 4}
    pretrained = build(denoiser_kwargs=kwargs)
    randomize(pretrained.denoiser)
    path = tmp_path / "pretrained.ckpt"
    torch.save({"state_dict": pretrained.state_dict()}, path)
    model = build(denoiser_kwargs=kwargs, finetune=DiffFit(), init_checkpoint=str(path))
    blocks = model.denoiser.blocks
    for index in (0, 1):  # the first half of 4 blocks: residual branches, qkv output (3 x dim) and output projection
        assert blocks[index].gamma_attn.shape == (32,) and blocks[index].gamma_mlp.shape == (32,)
        assert blocks[index].attn.qkv.gamma_out.shape == (96,) and blocks[index].attn.proj.gamma_out.shape == (32,)
        assert torch.equal(blocks[index].gamma_mlp, torch.ones(32))
        assert torch.equal(blocks[index].attn.qkv.gamma_out, torch.ones(96))
    assert blocks[2].gamma_attn is None and blocks[3].gamma_mlp is None and not hasattr(blocks[2].attn.qkv, "gamma_out")
    expected = {n for n, _ in model.denoiser.named_parameters()  # thuml/Diffusion-Tuning: bias, norm, gamma, y_embed
                if n.endswith(".bias") or "gamma" in n.split(".")[-1] or n == "y_embedder.weight"}
    trainable = {n for n, p in model.denoiser.named_parameters() if p.requires_grad}
    assert trainable == expected and len(expected) == 3 + 1 + 4 * 5 + 2 * 4 + 2  # embedders, y, biases, gammas, final
    assert set(DiffFit().parameter_names(model.denoiser)) == expected
    optimizer = build_optimizer(model.optimizer_root(), OptimConfig())
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        model.denoiser.get_parameter(n).numel() for n in expected)
    # pretrained weights loaded (EMA copy preferred), new gammas at 1: the same function as the pretrained model
    x, t, labels = torch.randn(2, 3, 32, 32), torch.tensor([3, 70]), torch.tensor([0, 2])
    assert torch.allclose(model.denoiser(x, t, labels), pretrained.ema.module(x, t, labels), atol=1e-6)
    ranged = build(denoiser_kwargs=kwargs, finetune=DiffFit(first_block=1, last_block=4))
    assert [b.gamma_attn is not None for b in ranged.denoiser.blocks] == [False, True, True, True]
    with torch.no_grad():  # a per-channel gamma scales its branch channel by channel
        block = randomize(ranged.denoiser.blocks[1])
        x, cond = torch.randn(2, 5, 32), torch.randn(2, 32)
        block.gamma_mlp.zero_()
        block.gamma_attn[:16] = 0
        block.gamma_attn[16:] = 2
        shift1, scale1, gate1, *_ = block.adaLN_modulation(cond).chunk(6, dim=-1)
        attn = gate1.unsqueeze(1) * block.attn(modulate(block.norm1(x), shift1, scale1))
        out = block(x, cond)
        assert torch.allclose(out[..., :16], x[..., :16], atol=1e-6)
        assert torch.allclose(out[..., 16:], (x + 2 * attn)[..., 16:], atol=1e-5)
        # inside the attention: qkv's output (bias included) and the output projection's, channel by channel
        block.gamma_attn.fill_(1)
        attention = block.attn
        tokens = torch.randn(2, 5, 32)
        attention.qkv.gamma_out.copy_(torch.linspace(0.5, 1.5, 96))
        attention.proj.gamma_out.copy_(torch.linspace(2.0, 0.0, 32))
        qkv = (tokens @ attention.qkv.weight.T + attention.qkv.bias) * torch.linspace(0.5, 1.5, 96)
        q, k, v = qkv.view(2, 5, 3, 2, 16).permute(2, 0, 3, 1, 4)  # (B, heads, N, 16) each
        mixed = (torch.softmax(q @ k.transpose(-1, -2) / 4, dim=-1) @ v).transpose(1, 2).reshape(2, 5, 32)
        expected = (mixed @ attention.proj.weight.T + attention.proj.bias) * torch.linspace(2.0, 0.0, 32)
        assert torch.allclose(attention(tokens), expected, atol=1e-5)


def test_difffit_residual_only_layout_is_the_named_option():
    kwargs = {**TINY, "depth": 4}
    model = build(denoiser_kwargs=kwargs, finetune=DiffFit(scale_linears=False))
    blocks = model.denoiser.blocks
    assert blocks[0].gamma_attn.shape == (32,) and type(blocks[0].attn.qkv) is nn.Linear
    gammas = [n for n, _ in model.denoiser.named_parameters() if "gamma" in n]
    assert gammas == ["blocks.0.gamma_attn", "blocks.0.gamma_mlp", "blocks.1.gamma_attn", "blocks.1.gamma_mlp"]


def test_init_checkpoint_of_another_denoiser_is_refused(tmp_path):
    path = tmp_path / "dimr.ckpt"
    torch.save({"state_dict": build("dimr").state_dict()}, path)
    with pytest.raises(ConfigError, match="model.denoiser"):
        build(finetune=DiffFit(), init_checkpoint=str(path))
    torch.save({"state_dict": build(denoiser_kwargs={**TINY, "learn_sigma": False}).state_dict()}, path)
    with pytest.raises(ConfigError, match="model.denoiser"):  # learned vs fixed variance: another output layer
        build(init_checkpoint=str(path))
    torch.save({"state_dict": {"backbone.fc.weight": torch.zeros(1)}}, path)
    with pytest.raises(ConfigError, match="not a diffusion checkpoint"):
        build(finetune=DiffFit(), init_checkpoint=str(path))


def test_difffit_trainable_fraction_of_the_dit_xl2_shape():
    with torch.device("meta"):  # 675M parameters counted without allocating them
        net = DiT(32, 4, 1000, patch_size=2, dim=1152, depth=28, heads=16)
    total = sum(p.numel() for p in net.parameters())
    assert total + 256 * 1152 == 675_129_632  # the reference's count (its pos_embed is a frozen Parameter)
    recipe = DiffFit()
    recipe.add_scales(net)
    recipe.freeze(net)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    dim = 1152
    biases = 28 * (3 + 1 + 4 + 1 + 6) * dim + dim + 2 * dim + 2 * dim + 2 * 2 * 8  # blocks, patch, t-MLP, final
    gammas = 14 * (dim + dim + 3 * dim + dim)  # blocks 1-14: attention and MLP branches, qkv (3 x dim), proj
    assert trainable == biases + gammas + 1001 * dim  # + the class embedding
    fraction = 100 * trainable / (total + gammas)
    print(f"DiffFit on DiT-XL/2 (1000 classes): {trainable:,} trainable = {fraction:.3f}% "
          f"(without the class embedding {100 * (trainable - 1001 * dim) / total:.3f}%; paper: 0.12%)")
    assert fraction < 0.3


# --- DiMR ---------------------------------------------------------------------------------------------
def test_dimr_time_condition_is_the_reference_linear_map_of_the_step():
    # qihao067/DiMR train.py (LSimple and the DPM-Solver model_fn): log_snr = (n / 1000) * 8 - 4 for the 1-based
    # step n, and TD-LN divides by 4. visionlab's 0-based t is n - 1.
    t = torch.tensor([0, 249, 499, 999])
    reference = ((t + 1).float() / 1000 * 8 - 4) / 4
    assert torch.allclose(time_condition(t, 1000), reference)
    assert time_condition(t, 1000).tolist() == pytest.approx([-0.998, -0.5, 0.0, 1.0])
    schedule = NoiseSchedule("linear", 100)
    steps = torch.tensor([0, 99])
    assert torch.equal(time_condition(steps, 100, "log_snr", schedule.log_snr), schedule.log_snr[steps] / 4)
    # the denoiser feeds exactly that to every TD-LN
    net = DiMR(input_size=32, patch_size=4, dim=32, depth=1, heads=2, conv_depth=1, timesteps=100)
    seen = []
    net.stages[0].out_norm.register_forward_hook(lambda module, args, out: seen.append(args[1]))
    net(torch.randn(2, 3, 32, 32), torch.tensor([0, 99]), torch.tensor([0, 1]))
    assert seen[0].tolist() == pytest.approx([2 * 1 / 100 - 1, 1.0])
    earlier = DiMR(input_size=32, patch_size=4, dim=32, depth=1, heads=2, conv_depth=1, timesteps=100,
                   time_input="log_snr")
    seen.clear()
    earlier.stages[0].out_norm.register_forward_hook(lambda module, args, out: seen.append(args[1]))
    earlier(torch.randn(2, 3, 32, 32), torch.tensor([0, 99]), torch.tensor([0, 1]))
    assert torch.allclose(seen[0], schedule.log_snr[[0, 99]] / 4)
    with pytest.raises(ConfigError, match="time_input"):
        DiMR(time_input="t")


def test_td_layernorm_starts_time_independent_with_separate_per_channel_mixing():
    norm = TDLayerNorm(16)
    x = torch.randn(3, 5, 16)
    condition = torch.tensor([-0.998, 0.0, 1.0])  # the time condition, 2 (t + 1) / T - 1
    plain = nn.functional.layer_norm(x, (16,), eps=1e-5)
    assert torch.allclose(norm(x, condition), plain, atol=1e-6)  # both endpoints equal at init
    for name in ("scale", "shift"):
        assert getattr(norm, f"{name}_mix_weight").shape == (16,) and getattr(norm, f"{name}_mix_bias").shape == (16,)
    with torch.no_grad():
        norm.scale_0.fill_(2.0)
        norm.shift_1.fill_(0.5)
        norm.scale_mix_weight.fill_(1.0)  # scale mixing sigmoid(2c); shift mixing sigmoid(c)
    mix_scale, mix_shift = torch.sigmoid(2 * condition), torch.sigmoid(condition)
    scale = 1 + mix_scale * (2 - 1)  # p_1 + s (p_0 - p_1)
    shift = 0.5 + mix_shift * (0 - 0.5)
    expected = plain * scale.view(3, 1, 1) + shift.view(3, 1, 1)
    out = norm(x, condition)
    assert torch.allclose(out, expected, atol=1e-5)
    out.square().sum().backward()
    assert norm.scale_mix_weight.grad.abs().min() > 0 and norm.shift_mix_weight.grad.abs().min() > 0


def test_dimr_predicts_at_every_resolution_and_samples_from_the_highest():
    model = build("dimr", denoiser_kwargs=dict(patch_size=4, dim=32, depth=3, heads=2, conv_depth=1), ema_decay=0)
    net = randomize(model.denoiser).eval()
    x, t, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 90]), torch.tensor([0, 1])
    outputs = net(x, t, labels)
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 8, 8), (2, 3, 16, 16), (2, 3, 32, 32)]
    assert net.loss_weights == [1 / 16, 1 / 4, 1.0]
    assert torch.equal(model._highest_resolution(net)(x, t, labels), outputs[-1])
    by_time = net(x[:1].expand(2, -1, -1, -1), torch.tensor([1, 90]), torch.tensor([0, 0]))[-1]
    by_label = net(x[:1].expand(2, -1, -1, -1), torch.tensor([1, 1]), torch.tensor([0, 1]))[-1]
    assert not torch.allclose(by_time[0], by_time[1]) and not torch.allclose(by_label[0], by_label[1])
    with pytest.raises(ConfigError, match="power of 2"):
        DiMR(input_size=32, patch_size=6)


def test_multiscale_targets_and_the_weighted_loss_per_resolution():
    from modules.components.diffusion.dimr import multiresolution_loss, multiscale_targets

    noise = torch.arange(16.0).view(1, 1, 4, 4)
    coarse, fine = multiscale_targets(noise, [2, 4])
    assert torch.equal(fine, noise)
    assert torch.allclose(coarse, torch.tensor([[0 + 1 + 4 + 5, 2 + 3 + 6 + 7], [8 + 9 + 12 + 13, 10 + 11 + 14 + 15]]) / 2.0)
    white = multiscale_targets(torch.randn(64, 1, 32, 32), [8])[0]
    assert white.var().item() == pytest.approx(1.0, rel=0.05)  # the scale correction keeps unit variance
    predictions = [torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 4, 4)]
    expected = 0.25 * coarse.square().mean() + 1.0 * (1 - noise).square().mean()
    assert multiresolution_loss(predictions, noise, [0.25, 1.0]).item() == pytest.approx(expected.item(), rel=1e-6)
    # the module trains on that loss with its own draws of t and noise
    model = build("dimr", ema_decay=0)
    x0, labels = torch.rand(2, 3, 32, 32) * 2 - 1, torch.tensor([0, 1])
    generator = torch.Generator().manual_seed(5)
    t = torch.randint(0, 100, (2,), generator=generator)
    drawn = torch.randn(x0.shape, generator=generator)
    outputs = model.denoiser(q_sample(x0, t, drawn, model.schedule), t, labels)
    manual = multiresolution_loss(outputs, drawn, model.denoiser.loss_weights)
    assert model.diffusion_loss(x0, labels, torch.Generator().manual_seed(5)).item() == pytest.approx(manual.item(), rel=1e-6)


def test_dimr_higher_stage_reads_all_transformer_block_outputs_and_stages_have_long_skips():
    net = randomize(DiMR(32, 3, 3, patch_size=2, dim=32, depth=3, heads=2, conv_depth=3, timesteps=100)).eval()
    low, high = net.stages
    recorded = {}
    low.blocks[0].register_forward_pre_hook(lambda m, args: recorded.__setitem__("input", args[0]))
    for i, block in enumerate(low.blocks):
        block.register_forward_hook(lambda m, args, out, i=i: recorded.__setitem__(i, out))
    high.up_norm_in.register_forward_pre_hook(lambda m, args: recorded.__setitem__("lowres", args[0]))
    high.skip_denses[0].register_forward_pre_hook(lambda m, args: recorded.__setitem__("skip", args[0]))
    high_blocks = {}
    for i, block in enumerate(high.blocks):
        block.register_forward_hook(lambda m, args, out, i=i: high_blocks.__setitem__(i, out))
    net(torch.randn(2, 3, 32, 32), torch.tensor([3, 50]), torch.tensor([0, 2]))
    grid = lambda tokens: tokens[:, 1:].reshape(2, 16, 16, 32)  # noqa: E731  drop the class token
    expected = torch.cat([grid(recorded["input"])] + [grid(recorded[i]) for i in range(3)], dim=-1)
    assert torch.equal(recorded["lowres"], expected)  # input + every block output: 4 x 32 channels
    assert isinstance(high.up_norm_in, TDLayerNorm) and isinstance(high.up_norm_out, TDLayerNorm)
    # long skip: the first "out" block reads Linear(cat(middle output, first "in" block output))
    assert len(high.blocks) == 3 and len(high.skip_denses) == 1
    assert torch.equal(recorded["skip"], torch.cat([high_blocks[1], high_blocks[0]], dim=-1))
