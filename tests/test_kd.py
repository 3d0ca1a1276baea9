"""Knowledge distillation: soft targets and losses against hand values, FerKD, projectors, frozen teachers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from modules.components.kd.distill import (
    CrossAttention,
    CrossAttentionProjector,
    LinearProjector,
    PerTokenLinear,
    build_teacher,
    ensemble_soft_targets,
    ferkd_calibrate,
    kd_loss,
    renormalised_sparse_targets,
    sparse_soft_targets,
    student_tokens_and_logits,
    teacher_tokens,
    topk_probabilities,
)
from modules.components.checkpoints import load_checkpoint
from modules.components.errors import ConfigError
from modules.components.kd.mixing import SelfMix, SoftTargetMix, cutmix, mixup, same_image_partners
from modules.components.kd.targets import FerKD, KDTargets, OnlineTeachers, StoredLogits, StoredLogitsRenormalised
from modules.components.kd.terms import FeatureKD, HardLabels, LogitDiscriminator, ProbabilityDiscriminator
from modules.components.optim import OptimConfig
from modules.kd import DistillationModule
from tests.conftest import CONFIGS, NamedTensors, cli_args


# --- pure functions --------------------------------------------------------------------------------
def test_ensemble_target_is_mean_of_softmaxes_by_hand():
    first = torch.tensor([[0.0, math.log(3.0)]])  # softmax (1/4, 3/4)
    second = torch.tensor([[0.0, 0.0]])  # softmax (1/2, 1/2)
    assert torch.allclose(ensemble_soft_targets([first, second]), torch.tensor([[0.375, 0.625]]))
    # T = 2 halves the logits: softmax(0, ln 3 / 2) = (1, sqrt 3) / (1 + sqrt 3)
    expected = torch.tensor([[1.0, math.sqrt(3.0)]]) / (1 + math.sqrt(3.0))
    assert torch.allclose(ensemble_soft_targets([first], temperature=2.0), expected)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_loss_zero_iff_student_equals_teacher_and_scaled_by_t_squared(temperature):
    torch.manual_seed(0)
    teacher, student = torch.randn(8, 10) * 3, torch.randn(8, 10) * 3
    targets = ensemble_soft_targets([teacher], temperature)
    assert kd_loss(teacher.clone(), targets, temperature).abs() < 1e-6
    loss = kd_loss(student, targets, temperature)
    q = (student / temperature).softmax(-1)
    by_hand = (targets * (targets.log() - q.log())).sum(-1).mean() * temperature**2
    assert loss > 1e-3 and torch.allclose(loss, by_hand, rtol=1e-5)


def test_kd_loss_handles_zero_target_entries_and_weights():
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    per_sample = torch.tensor([math.log(3.0), math.log(3.0) - math.log(2.0)])
    assert torch.allclose(kd_loss(logits, targets), per_sample.mean())
    weights = torch.tensor([0.0, 2.0])
    assert torch.allclose(kd_loss(logits, targets, weights=weights), (per_sample * weights).mean())


def test_renormalised_sparse_targets_from_topk():
    """FKD's ``marginal_renorm``: softmax over the stored top-k only (k = C: the full softmax)."""
    torch.manual_seed(0)
    logits = torch.randn(4, 6)
    values, indices = logits.topk(6, dim=-1)
    assert torch.allclose(renormalised_sparse_targets(values, indices, 6, 2.0), (logits / 2.0).softmax(-1), atol=1e-7)
    values, indices = logits.topk(2, dim=-1)
    targets = renormalised_sparse_targets(values.half(), indices, 6)
    assert torch.allclose(targets.sum(-1), torch.ones(4))
    assert (targets > 0).sum(-1).tolist() == [2, 2, 2, 2]
    assert torch.allclose(targets.gather(1, indices), values.half().float().softmax(-1))
    smoothed = renormalised_sparse_targets(values, indices, 6, rest_mass=0.2)
    outside = smoothed.scatter(1, indices, 0.0)
    assert torch.allclose(outside.sum(-1), torch.full((4,), 0.2)) and torch.allclose(smoothed.sum(-1), torch.ones(4))


# logits exactly representable in float16, no ties: top-5 of 10 classes
HAND_LOGITS = [4.0, 3.0, 2.0, 1.0, 0.5, 0.0, -1.0, -1.5, -2.0, -3.0]


def _hand_teacher(temperature: float) -> tuple[list[float], float]:
    """The teacher's full tempered softmax and the TV distance of the true-remainder rebuild, by hand."""
    weights = [math.exp(z / temperature) for z in HAND_LOGITS]
    full = [w / sum(weights) for w in weights]
    tail = full[5:]
    rest = sum(tail) / 5  # the true remainder spread over the 5 unstored classes
    return full, 0.5 * sum(abs(rest - p) for p in tail)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_true_remainder_target_keeps_the_teachers_mass_by_hand(temperature):
    """Top-5 probabilities + the remainder rebuild the teacher's target up to the tail's unevenness only;
    renormalising over the top-5 (the former default) is off by the whole tail mass."""
    full, tv_by_hand = _hand_teacher(temperature)
    logits = torch.tensor([HAND_LOGITS])
    values, indices = logits.topk(5, dim=-1)
    lse = (logits / temperature).logsumexp(-1)
    targets = sparse_soft_targets(topk_probabilities(values, lse, temperature), indices, 10)
    teacher = torch.tensor([full])
    tv = 0.5 * (targets - teacher).abs().sum()
    assert torch.allclose(targets.sum(), torch.tensor(1.0), atol=1e-6)
    assert torch.allclose(targets[0, :5], teacher[0, :5], atol=1e-7)  # stored classes exact
    assert abs(tv.item() - tv_by_hand) < 1e-6
    renormalised = renormalised_sparse_targets(values, indices, 10, temperature)
    tv_renorm = 0.5 * (renormalised - teacher).abs().sum()
    assert abs(tv_renorm.item() - sum(full[5:])) < 1e-6  # all the tail mass moved onto the top-5
    assert tv < tv_renorm / 2
    assert torch.allclose(sparse_soft_targets(torch.tensor([full]), torch.arange(10)[None], 10), teacher)  # k = C


def test_ferkd_calibration_hand_case():
    targets = torch.tensor([
        [0.05, 0.90, 0.05, 0.00],  # true class 0, confidence 0.05: hard negative
        [0.10, 0.50, 0.40, 0.00],  # true class 1, confidence 0.5: hard positive, kept
        [0.00, 0.00, 0.95, 0.05],  # true class 2, confidence 0.95: easy positive, kept, easy weight
    ])
    labels = torch.tensor([0, 1, 2])
    calibrated, weights = ferkd_calibrate(targets, labels, low=0.2, high=0.9, negative_smoothing=0.4,
                                          negative_weight=0.5, easy_weight=0.25)
    assert torch.allclose(calibrated[0], torch.tensor([0.7, 0.1, 0.1, 0.1]))
    assert torch.equal(calibrated[1:], targets[1:])
    assert weights.tolist() == [0.5, 1.0, 0.25]
    with pytest.raises(ConfigError):
        ferkd_calibrate(targets, labels, low=0.9, high=0.2)


def test_projector_shapes():
    tokens = torch.randn(3, 9, 16)  # a 3x3 student map with 16 channels
    assert CrossAttentionProjector(16, 24, teacher_tokens=64, num_heads=5).forward(tokens).shape == (3, 64, 24)
    assert LinearProjector(16, 24, student_tokens=9, teacher_tokens=16)(tokens).shape == (3, 16, 24)


@pytest.mark.parametrize("teacher, projection, expected", [
    ("test_vit", None, CrossAttentionProjector),  # default: cross-attention for a token (ViT) teacher
    ("test_resnet", None, LinearProjector),  # ... per-token linear for a CNN teacher
    ("test_vit", PerTokenLinear(), LinearProjector),  # an injected projection wins
    ("test_resnet", CrossAttention(num_heads=2), CrossAttentionProjector),
])
def test_feature_kd_builds_the_injected_projection_for_the_probed_shapes(teacher, projection, expected):
    import timm

    torch.manual_seed(0)
    teachers = [timm.create_model(teacher, num_classes=10, img_size=32) if teacher == "test_vit"
                else timm.create_model(teacher, num_classes=10)]
    term = FeatureKD(1.0, projector=projection)
    student = timm.create_model("test_resnet", num_classes=10)
    term.bind(SimpleNamespace(backbone=student, teachers=teachers, num_classes=10, image_size=32))
    assert type(term.projector) is expected
    tokens, _ = student_tokens_and_logits(student.eval(), torch.zeros(2, 3, 32, 32), None)
    target = teacher_tokens(teachers[0], torch.zeros(2, 3, 32, 32), None)
    assert term.projector(tokens).shape == target.shape  # (B, N_t, D_t)
    recorded = term.record()["init_args"]["projector"]
    assert recorded == (None if projection is None else
                        {"class_path": f"modules.components.kd.distill.{type(projection).__name__}",
                         "init_args": {"num_heads": 2} if isinstance(projection, CrossAttention) else {}})
    if isinstance(projection, CrossAttention):
        assert term.projector.attention.num_heads == 2


def test_probability_discriminator_reverses_the_students_gradient():
    torch.manual_seed(0)
    disc = ProbabilityDiscriminator(hidden_dim=8)
    disc.bind(SimpleNamespace(backbone=nn.Identity(), teachers=[], num_classes=5, image_size=32))
    teacher = torch.rand(4, 5).softmax(-1)
    student = torch.rand(4, 5).softmax(-1).requires_grad_()
    disc.loss(student, teacher).backward()
    plain = student.detach().clone().requires_grad_()
    logits = disc.net(plain).squeeze(-1)
    nn.functional.binary_cross_entropy_with_logits(logits, torch.zeros(4)).div(2).backward()
    assert torch.allclose(student.grad, -plain.grad, atol=1e-6) and plain.grad.abs().sum() > 0


def test_logit_discriminator_is_meal_v2s_conv_stack_minimised_jointly():
    """MEAL V2's code: logits (not probabilities) through 1x1 convs C -> C/r -> C/r^2 -> 2 with ReLUs, BCE
    against [1, 0] (student) / [0, 1] (teachers); the student gets the plain gradient of that same loss."""
    torch.manual_seed(0)
    disc = LogitDiscriminator(weight=1.0, reduction=2)
    disc.bind(SimpleNamespace(backbone=nn.Identity(), teachers=[], num_classes=20, image_size=32))
    convs = [m for m in disc.net if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(20, 10, (1, 1)), (10, 5, (1, 1)), (5, 2, (1, 1))]
    student = (torch.randn(3, 20) * 3).requires_grad_()
    teacher = torch.randn(3, 20) * 3
    loss = disc.loss(student, teacher)
    # by hand: the same stack as matrices, ReLU after each, BCE-with-logits against the paper's targets
    hidden = torch.cat([student, teacher])
    for conv in convs:
        hidden = (hidden @ conv.weight[:, :, 0, 0].T + conv.bias).relu()
    truth = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3)
    by_hand = -(truth * nn.functional.logsigmoid(hidden) + (1 - truth) * nn.functional.logsigmoid(-hidden)).mean()
    assert torch.allclose(loss, by_hand, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, student, retain_graph=True)
    (grad_by_hand,) = torch.autograd.grad(by_hand, student)
    assert torch.allclose(grad, grad_by_hand, atol=1e-7) and grad.abs().sum() > 0  # not reversed


def test_teacher_from_a_classifier_checkpoint(tmp_path):
    torch.manual_seed(0)
    trained = build_teacher("test_resnet", num_classes=4)
    path = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in trained.state_dict().items()},
                "hyper_parameters": {"backbone": "test_resnet", "backbone_kwargs": None, "num_classes": 4, "image_size": 32}}, path)
    teacher = build_teacher(str(path), num_classes=4)
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(teacher(images), trained(images))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    student_path = tmp_path / "student.ckpt"  # a distilled student's checkpoint teaches too
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in trained.state_dict().items()},
                "hyper_parameters": {"student": "test_resnet", "num_classes": 4, "image_size": 32}}, student_path)
    assert torch.equal(build_teacher(str(student_path), num_classes=4)(images), trained(images))
    with pytest.raises(ConfigError, match="predicts 4 classes"):
        build_teacher(str(path), num_classes=10)
    with pytest.raises(ConfigError, match="does not exist"):
        build_teacher(str(tmp_path / "missing.ckpt"), num_classes=4)


# --- the LightningModule ---------------------------------------------------------------------------
class ArmedTeacher(nn.Module):
    """A teacher that raises once armed: proves a code path never runs it."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.linear, self.armed = nn.Linear(1, num_classes), False

    def forward(self, images):
        if self.armed:
            raise AssertionError("the teacher ran")
        return self.linear(images.mean(dim=(1, 2, 3))[:, None])


def _loader(n: int = 32, stored: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(n, 3, 32, 32, generator=generator), torch.randint(0, 10, (n,), generator=generator)
    if not stored:
        return DataLoader(NamedTensors(images, labels), batch_size=8)
    logits = torch.randn(n, 10, generator=generator)
    values, indices = logits.topk(3, dim=-1)
    stored_batches = [{"image": images[i:i + 8], "label": labels[i:i + 8], "topk_values": values[i:i + 8],
                       "topk_indices": indices[i:i + 8], "topk_logsumexp": logits[i:i + 8].logsumexp(-1),
                       "logits_temperature": 1.0} for i in range(0, n, 8)]
    return DataLoader(stored_batches, batch_size=None)


def _fit(model: DistillationModule, tmp_path, stored: bool = False, **trainer_kwargs) -> pl.Trainer:
    pl.seed_everything(0)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, default_root_dir=tmp_path, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, **trainer_kwargs)
    trainer.fit(model, _loader(stored=stored), _loader(16) if trainer_kwargs.get("limit_val_batches", 1) else None)
    return trainer


def _student(teachers=(), **parts) -> DistillationModule:
    targets = parts.pop("targets", None) or OnlineTeachers(list(teachers))
    return DistillationModule("test_resnet", num_classes=10, image_size=32, targets=targets, **parts)


ALL_PARTS = {"terms": [FeatureKD(1.0), LogitDiscriminator(0.1, reduction=2), HardLabels(0.5)], "calibration": FerKD()}


@pytest.mark.parametrize("options", [{}, ALL_PARTS])
def test_teachers_frozen_in_eval_out_of_optimizer_and_checkpoint(tmp_path, options):
    torch.manual_seed(0)
    model = _student(["test_resnet", "test_vit"], optim=OptimConfig(name="sgd", lr=0.5, warmup_epochs=0), **options)
    before = {k: v.clone() for k, v in model.teachers.state_dict().items()}  # BN running stats included
    student_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainer = _fit(model, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.teachers.state_dict().items())
    assert any(not torch.equal(student_before[k], v) for k, v in model.backbone.state_dict().items())
    assert not model.teachers.training and model.backbone.training
    model.train()
    assert not any(t.training for t in model.teachers.modules())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized.isdisjoint(id(p) for p in model.teachers.parameters())
    assert len(optimized) == len(list(model.backbone.parameters())) + len(list(model.terms.parameters()))
    if options:
        assert len(list(model.terms.parameters())) > 0
    trainer.save_checkpoint(tmp_path / "kd.ckpt")
    saved = load_checkpoint(tmp_path / "kd.ckpt")  # weights_only: the hyper-parameters are primitives
    assert saved["state_dict"] and not any(k.startswith("targets.teachers.") for k in saved["state_dict"])
    assert saved["hyper_parameters"]["targets"]["class_path"] == "modules.components.kd.targets.OnlineTeachers"
    reloaded = DistillationModule.load_from_checkpoint(tmp_path / "kd.ckpt", weights_only=False)
    assert type(reloaded.calibration) is type(model.calibration) and len(reloaded.terms) == len(model.terms)
    assert torch.equal(reloaded.backbone.conv1[0].weight, model.backbone.conv1[0].weight)
    student_only = DistillationModule.load_from_checkpoint(tmp_path / "kd.ckpt", weights_only=False, strict=False,
                                                           targets=StoredLogits(), terms=[], calibration=None)
    assert len(student_only.teachers) == 0 and torch.equal(student_only.backbone.fc.weight, model.backbone.fc.weight)


def test_training_step_is_the_weighted_sum_of_its_terms(tmp_path):
    """loss = kd_weight * KL + sum(weight * term), each term as its own function computes it."""
    torch.manual_seed(0)
    model = _student(["test_resnet"], kd_weight=0.7, terms=[HardLabels(0.5, label_smoothing=0.1), LogitDiscriminator(0.2, reduction=2)])
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        loss, logs = model.distillation_loss({"image": images, "label": labels})
    with torch.no_grad():
        logits, teacher = model.backbone(images), model.teachers[0](images)
        targets = teacher.softmax(-1)
        expected = (0.7 * kd_loss(logits, targets) + 0.5 * nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
                    + 0.2 * model.terms[1].loss(logits, teacher))
    assert torch.allclose(loss, expected, atol=1e-6) and set(logs) == {"kd_loss", "hard_loss", "disc_loss"}


def test_stored_logits_mode_runs_no_teacher(tmp_path):
    model = _student(targets=StoredLogits())
    assert _fit(model, tmp_path, stored=True, limit_val_batches=0).global_step == 4
    assert _fit(_student(targets=StoredLogitsRenormalised(rest_mass=0.1)), tmp_path, stored=True).global_step == 4
    with pytest.raises(ConfigError, match="no stored logits"):
        _fit(_student(targets=StoredLogits()), tmp_path)
    with pytest.raises(ConfigError, match="no teachers"):
        _fit(_student(), tmp_path)
    with pytest.raises(ConfigError, match="stored at temperature 1.0"):
        _fit(_student(targets=StoredLogits(), temperature=2.0), tmp_path, stored=True)


def test_bad_teachers_fail_with_config_errors():
    with pytest.raises(ConfigError, match="outputs 5 classes"):
        _student([ArmedTeacher(5)])
    with pytest.raises(ConfigError, match="online teacher"):
        _student(terms=[FeatureKD(1.0)])


def test_cli_fast_dev_run_debug_yaml(run_cli, tmp_path, beton_cache):
    assert run_cli(cli_args(tmp_path, beton_cache, "--trainer.fast_dev_run", "true", model="kd/debug.yaml")) == 0


@pytest.mark.parametrize("config", ["kd/stored_logits.yaml", "kd/ferkd_stored.yaml"])
def test_cli_store_logits_then_fit_stored_logits_yaml(run_cli, tmp_path, beton_cache, config):
    teacher = build_teacher("test_resnet", num_classes=10)
    checkpoint = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in teacher.state_dict().items()},
                "hyper_parameters": {"backbone": "test_resnet", "num_classes": 10, "image_size": 32}}, checkpoint)
    limits = ["--data.init_args.loader.init_args.cache_dir", str(beton_cache), "--data.init_args.train_limit", "256",
              "--data.init_args.val_limit", "128"]
    logits = tmp_path / "train_logits.vlsl"
    assert run_cli(["store-logits", "--config", str(CONFIGS / "data/fashion_mnist.yaml"), *limits, "--teacher", str(checkpoint),
                    "--epochs", "2", "--topk", "3", "--output", str(logits), "--device", "cpu"]) == 0
    args = cli_args(tmp_path, beton_cache, *limits[2:], "--data.init_args.batches.init_args.logits_path", str(logits),
                    "--model.init_args.student", "test_resnet", "--trainer.max_epochs", "2", model=config)
    assert run_cli(args) == 0
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 4  # 2 epochs x 2 batches
    reloaded = DistillationModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert type(reloaded.targets) is StoredLogits


# --- mixing crops and soft targets ------------------------------------------------------------------
def _coded_batch(index: list[int]):
    """Crop i is the constant image i and has the one-hot target of class i: mixing is readable from both."""
    n = len(index)
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 8, 8).clone()
    return {"image": images, "label": torch.arange(n), "index": torch.tensor(index)}, KDTargets(torch.eye(n), weights=torch.arange(1.0, n + 1))


def test_same_image_partners():
    assert same_image_partners(torch.tensor([5, 7, 5, 7])).tolist() == [2, 3, 0, 1]  # crop-major, 2 crops each
    assert same_image_partners(torch.tensor([3, 3, 3, 9, 9])).tolist() == [1, 2, 0, 4, 3]
    with pytest.raises(ConfigError, match="crops_per_image"):
        same_image_partners(torch.tensor([1, 2, 2]))


def test_cutmix_and_mixup_mix_targets_by_the_pixels_share_by_hand():
    batch, targets = _coded_batch([0, 1, 2, 3])
    partners = torch.tensor([1, 0, 3, 2])
    mixed, out = cutmix(batch["image"], targets, partners, (0, 4, 0, 2))  # 4 x 2 of 8 x 8 pixels pasted
    lam = 1 - 8 / 64
    assert torch.equal(mixed[0, :, :4, :2], torch.ones(3, 4, 2)) and torch.equal(mixed[0, :, 4:], torch.zeros(3, 4, 8))
    assert torch.allclose(out.probs[0], torch.tensor([lam, 1 - lam, 0.0, 0.0]))
    assert torch.allclose(out.weights, lam * targets.weights + (1 - lam) * targets.weights[partners])
    mixed, out = mixup(batch["image"], targets, partners, 0.3)
    assert torch.allclose(mixed[2], torch.full((3, 8, 8), 0.3 * 2 + 0.7 * 3))
    assert torch.allclose(out.probs[2], torch.tensor([0.0, 0.0, 0.3, 0.7]))


def test_selfmix_mixes_only_crops_of_the_same_image():
    """FerKD's SelfMix: each crop's partner is the other crop of its own image, and its soft target is mixed
    by exactly the share of the partner's pixels it shows."""
    batch, targets = _coded_batch([10, 11, 12, 10, 11, 12])  # 3 images x 2 crops, crop-major
    pl.seed_everything(1)
    mixed_batch, out = SelfMix(alpha=1.0)(batch, targets)
    images = mixed_batch["image"]
    for crop in range(6):
        partner = (crop + 3) % 6
        share = (images[crop] == partner).float().mean()
        assert 0 < share < 1
        assert set(images[crop].unique().tolist()) == {float(crop), float(partner)}
        expected = torch.zeros(6)
        expected[crop], expected[partner] = 1 - share, share
        assert torch.allclose(out.probs[crop], expected, atol=1e-6)
    with pytest.raises(ConfigError, match="crops_per_image"):
        SelfMix()(*_coded_batch([0, 1, 2]))


@pytest.mark.parametrize("mixing", ["selfmix", "cutmix", "mixup"])
def test_mixing_mixes_the_ground_truth_labels_like_the_crops(mixing):
    """The hard-label term must score a mixed crop against its mixed label (as timm's mixup), not the original:
    in the coded batch the soft target of crop i is one-hot(label i), so the mixed labels equal the mixed targets."""
    batch, targets = _coded_batch([10, 11, 12, 10, 11, 12])
    pl.seed_everything(2)
    part = SelfMix() if mixing == "selfmix" else SoftTargetMix(mixup_share=1.0 if mixing == "mixup" else 0.0)
    mixed_batch, out = part(batch, targets)
    assert mixed_batch["label"].shape == (6, 6)
    torch.testing.assert_close(mixed_batch["label"], out.probs, rtol=0, atol=1e-6)
    assert not torch.equal(mixed_batch["label"], torch.eye(6))  # really mixed
    assert torch.equal(batch["label"], torch.arange(6))  # the input batch is left as it was
    loss = HardLabels()(SimpleNamespace(batch=mixed_batch, logits=torch.zeros(6, 6)))
    assert loss.item() == pytest.approx(math.log(6), rel=1e-6)  # uniform logits: CE = log C for any soft label


@pytest.mark.parametrize("mixup_share", [0.0, 1.0])
def test_soft_target_mix_pairs_across_the_batch_with_one_lambda(mixup_share):
    batch, targets = _coded_batch(list(range(8)))
    pl.seed_everything(0)
    mixed_batch, out = SoftTargetMix(mixup_share=mixup_share)(batch, targets)
    others = out.probs.masked_fill(torch.eye(8, dtype=torch.bool), 0)
    paired = others.sum(1) > 0  # a random permutation may pair a crop with itself (as FKD's randperm)
    partners = torch.where(paired, others.argmax(1), torch.arange(8))
    own = out.probs.diagonal()[paired]
    assert paired.sum() >= 2 and torch.allclose(own, own[:1].expand(len(own)))  # one lambda for the batch
    lam = float(own[0])
    if mixup_share:  # mixup: every pixel lam * own + (1 - lam) * partner
        expected = lam * torch.arange(8.0) + (1 - lam) * partners.float()
        assert torch.allclose(mixed_batch["image"].mean((1, 2, 3)), expected, atol=1e-5)
    else:  # CutMix: the partner's share of pixels is 1 - lam
        shares = (mixed_batch["image"] == partners.float().view(8, 1, 1, 1)).float().mean((1, 2, 3))
        assert torch.allclose(shares[paired], torch.tensor(1 - lam), atol=1e-6)


def test_stored_logits_with_selfmix_trains_and_reloads(tmp_path):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 10, generator=generator)
    values, indices = logits.topk(3, dim=-1)
    batch = {"image": torch.randn(8, 3, 32, 32, generator=generator), "label": torch.randint(0, 10, (8,), generator=generator),
             "index": torch.arange(4).repeat(2), "topk_values": values, "topk_indices": indices,
             "topk_logsumexp": logits.logsumexp(-1), "logits_temperature": 1.0}
    model = _student(targets=StoredLogits(), calibration=FerKD(), mixing=SelfMix())
    pl.seed_everything(0)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(model, DataLoader([batch, batch], batch_size=None))
    assert trainer.global_step == 2
    trainer.save_checkpoint(tmp_path / "kd.ckpt")
    assert type(DistillationModule.load_from_checkpoint(tmp_path / "kd.ckpt", weights_only=False).mixing) is SelfMix


# --- the hard-label term with an injected criterion (BCE, as the classifier takes) ------------------
def _hard_step(logits, labels) -> "KDStep":
    from modules.components.kd.terms import KDStep

    probs = torch.full_like(logits, 1.0 / logits.shape[-1])
    return KDStep({"image": torch.zeros(len(logits), 3, 8, 8), "label": labels}, logits, KDTargets(probs), 1.0, [])


def test_hard_labels_binary_cross_entropy_on_index_and_mixed_labels_by_hand():
    from timm.loss import BinaryCrossEntropy

    logits = torch.tensor([[math.log(3.0), 0.0]])  # sigmoid: 3/4, 1/2
    term = HardLabels(1.0, criterion=BinaryCrossEntropy(smoothing=0.0))
    # one-hot (1, 0): mean of -ln(3/4) and -ln(1 - 1/2) over the 2 logits
    by_hand = (math.log(4 / 3) + math.log(2.0)) / 2
    assert torch.allclose(term(_hard_step(logits, torch.tensor([0]))), torch.tensor(by_hand), atol=1e-6)
    # mixed labels (1/4, 3/4), e.g. mixup with lambda 1/4: -(1/4 ln 3/4 + 3/4 ln 1/4) and ln 2
    mixed = (-(0.25 * math.log(0.75) + 0.75 * math.log(0.25)) + math.log(2.0)) / 2
    assert torch.allclose(term(_hard_step(logits, torch.tensor([[0.25, 0.75]]))), torch.tensor(mixed), atol=1e-6)
    # timm's smoothing on index labels: off = s / C, on = 1 - s + s / C; s = 0.2 -> targets (0.9, 0.1)
    smoothed = HardLabels(1.0, criterion=BinaryCrossEntropy(smoothing=0.2))(_hard_step(logits, torch.tensor([0])))
    by_hand = (-(0.9 * math.log(0.75) + 0.1 * math.log(0.25)) + math.log(2.0)) / 2
    assert torch.allclose(smoothed, torch.tensor(by_hand), atol=1e-6)
    # the default stays cross-entropy: softmax(ln 3, 0) = (3/4, 1/4); soft labels by their cross-entropy
    assert torch.allclose(HardLabels(1.0)(_hard_step(logits, torch.tensor([0]))), torch.tensor(math.log(4 / 3)), atol=1e-6)
    soft_ce = -(0.25 * math.log(0.75) + 0.75 * math.log(0.25))
    assert torch.allclose(HardLabels(1.0)(_hard_step(logits, torch.tensor([[0.25, 0.75]]))), torch.tensor(soft_ce), atol=1e-6)


def test_hard_labels_criterion_in_the_students_loss_and_its_checkpoint(tmp_path):
    from timm.loss import BinaryCrossEntropy

    torch.manual_seed(0)
    model = _student(["test_resnet"], kd_weight=0.7, terms=[HardLabels(0.5, criterion=BinaryCrossEntropy(smoothing=0.1))])
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 9])
    with torch.no_grad():
        loss, logs = model.distillation_loss({"image": images, "label": labels})
        logits = model.backbone(images)
        targets = nn.functional.one_hot(labels, 10).float() * 0.9 + 0.1 / 10
        bce = -(targets * nn.functional.logsigmoid(logits) + (1 - targets) * nn.functional.logsigmoid(-logits)).mean()
        expected = 0.7 * kd_loss(logits, model.teachers[0](images).softmax(-1)) + 0.5 * bce
    assert torch.allclose(logs["hard_loss"], bce, atol=1e-6) and torch.allclose(loss, expected, atol=1e-6)
    spec = model.hparams["terms"][0]["init_args"]["criterion"]
    assert spec["class_path"] == "timm.loss.binary_cross_entropy.BinaryCrossEntropy"  # primitives: weights_only loads
    assert {k: spec["init_args"][k] for k in ("smoothing", "weight", "reduction", "pos_weight")} == {
        "smoothing": 0.1, "weight": None, "reduction": "mean", "pos_weight": None}
    trainer = _fit(model, tmp_path, limit_train_batches=1, limit_val_batches=0)
    trainer.save_checkpoint(tmp_path / "bce.ckpt")
    reloaded = DistillationModule.load_from_checkpoint(tmp_path / "bce.ckpt", weights_only=True)
    criterion = reloaded.terms[0].criterion
    assert isinstance(criterion, BinaryCrossEntropy) and criterion.smoothing == 0.1
    with pytest.raises(ConfigError, match="set the smoothing on the criterion"):
        HardLabels(1.0, label_smoothing=0.1, criterion=BinaryCrossEntropy())
    with pytest.raises(ConfigError, match="pos_weight"):
        HardLabels(1.0, criterion=BinaryCrossEntropy(pos_weight=torch.ones(10)))


def test_cli_hard_labels_bce_yaml_builds_the_criterion(run_cli, tmp_path, beton_cache):
    args = cli_args(tmp_path, beton_cache, "--trainer.fast_dev_run", "true", "--model.init_args.student", "test_resnet",
                    "--model.init_args.targets.init_args.teachers", "[test_resnet]", model="kd/hard_labels_bce.yaml")
    assert run_cli(args) == 0
