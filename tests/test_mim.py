"""Masked image modeling: masks, masked losses, visible-only MAE encoder, frozen MR-MAE teacher, transfer."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from modules.classification import ClassificationModule
from modules.components.errors import ConfigError
from modules.components.mim.masking import (
    fixed_generator,
    gather_tokens,
    mae_num_kept,
    mae_shuffle,
    masked_l1_loss,
    masked_mse_loss,
    normalized_patch_targets,
    patchify,
    simmim_mask,
    simmim_num_masked,
    token_mask_to_pixels,
    unpatchify,
)
from modules.components.checkpoints import load_checkpoint
from modules.components.optim import build_optimizer
from modules.components.masked_vit import encode
from modules.components.mim.encoders import frozen_encoder, masked_feature_map, teacher_tokens
from modules.linear_probe import LinearProbeModule
from modules.mae import MAEModule
from modules.mr_mae import MimicTeacher, MRMAEModule
from modules.simmim import SimMIMModule
from tests.conftest import NamedTensors, cli_args

VIT = "test_vit"
VIT_KWARGS = {"patch_size": 4, "depth": 2}  # 8x8 tokens at 32 px, 64-d


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# --- masks -----------------------------------------------------------------------------------------
def test_simmim_mask_ratio_exact_and_aligned_to_mask_patches():
    torch.manual_seed(0)
    mask = simmim_mask(16, (8, 8), mask_patch_cells=2, mask_ratio=0.6)  # 16 mask patches of 2x2 tokens
    assert mask.shape == (16, 64) and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [10 * 4] * 16  # ceil(0.6 * 16) = 10 mask patches per sample
    blocks = mask.view(16, 4, 2, 4, 2)
    assert (blocks == blocks[:, :, :1, :, :1]).all(), "every 2x2 mask patch is fully masked or fully visible"
    assert len({tuple(m.tolist()) for m in mask}) > 1, "samples get different masks"
    with pytest.raises(ValueError):
        simmim_mask(2, (8, 8), mask_patch_cells=3, mask_ratio=0.6)


def test_mae_shuffle_keeps_exact_count_and_inverts():
    torch.manual_seed(0)
    ids_keep, ids_restore, mask = mae_shuffle(8, 64, 0.75)
    assert ids_keep.shape == (8, 16) and mask.sum(dim=1).tolist() == [48] * 8
    for b in range(8):  # the kept ids are exactly the unmasked tokens
        assert sorted(ids_keep[b].tolist()) == torch.nonzero(~mask[b]).flatten().tolist()
    # Unshuffling [visible tokens, mask tokens] puts each visible token back at its own position.
    shuffled = torch.cat([ids_keep, torch.full((8, 48), -1)], dim=1)
    restored = torch.gather(shuffled, 1, ids_restore)
    assert torch.equal(restored[~mask], torch.arange(64).expand(8, 64)[~mask]) and (restored[mask] == -1).all()


def test_mask_counts_follow_the_references():
    # SimMIM (microsoft/SimMIM MaskGenerator): ceil(count * ratio); ViT-B 224 px, 32 px mask patches: 30 of 49.
    assert simmim_num_masked(49, 0.6) == 30
    mask = simmim_mask(3, (14, 14), mask_patch_cells=2, mask_ratio=0.6)
    assert mask.sum(dim=1).tolist() == [30 * 4] * 3
    # MAE (facebookresearch/mae random_masking): int(L * (1 - ratio)) visible.
    assert mae_num_kept(196, 0.75) == 49 and mae_num_kept(14, 0.75) == 3 and mae_num_kept(50, 0.6) == 20
    ids_keep, _, mask = mae_shuffle(2, 14, 0.75)
    assert ids_keep.shape == (2, 3) and mask.sum(dim=1).tolist() == [11, 11]
    with pytest.raises(ValueError):
        mae_num_kept(4, 0.9)  # no visible token left


def test_norm_pix_targets_use_unbiased_variance_and_eps_1e6():
    patches = torch.tensor([[[0.0, 1.0, 2.0, 3.0], [2.0, 2.0, 2.0, 2.0]]])
    target, mean, std = normalized_patch_targets(patches)
    var = (1.5 ** 2 + 0.5 ** 2 + 0.5 ** 2 + 1.5 ** 2) / 3  # unbiased: / (P - 1)
    expected = torch.tensor([-1.5, -0.5, 0.5, 1.5]) / math.sqrt(var + 1e-6)
    assert torch.allclose(target[0, 0], expected, rtol=1e-6) and torch.equal(target[0, 1], torch.zeros(4))
    assert std[0, 1, 0] == pytest.approx(1e-3) and mean[0, 0, 0] == 1.5


def _sincos_by_hand(dim: int, row: int, col: int) -> torch.Tensor:
    quarter = dim // 4
    omega = [1.0 / 10000 ** (k / quarter) for k in range(quarter)]
    values = [math.sin(col * w) for w in omega] + [math.cos(col * w) for w in omega]
    values += [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega]
    return torch.tensor(values)


def test_mae_fixed_sincos_position_embeddings_in_encoder_and_decoder():
    model = MAEModule(VIT, num_classes=10, image_size=32, backbone_kwargs=VIT_KWARGS, decoder_dim=32)
    encoder, decoder = model.backbone.pos_embed, model.decoder.pos_embed  # (1, 1 + 64, 64), (1, 64, 32)
    assert torch.equal(encoder[0, 0], torch.zeros(64)), "zero row for the class token"
    row, col = 2, 5
    assert torch.allclose(encoder[0, 1 + row * 8 + col], _sincos_by_hand(64, row, col), atol=1e-6)
    assert torch.allclose(decoder[0, row * 8 + col], _sincos_by_hand(32, row, col), atol=1e-6)
    assert not encoder.requires_grad and not decoder.requires_grad
    optimizer = build_optimizer(model, model.optim)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(encoder) not in optimized and id(decoder) not in optimized
    learned = MAEModule(VIT, num_classes=10, image_size=32, backbone_kwargs=VIT_KWARGS, learned_pos_embed=True)
    assert learned.backbone.pos_embed.requires_grad and learned.decoder.pos_embed.requires_grad
    assert learned.decoder.pos_embed.std() < 0.05, "learned: timm-style small random init"


def test_mae_reference_init_and_decoder_norm_eps():
    torch.manual_seed(0)
    model = MAEModule(VIT, num_classes=10, image_size=32, backbone_kwargs=VIT_KWARGS, decoder_dim=32)
    fc1 = model.backbone.blocks[0].mlp.fc1.weight  # (192, 64): Xavier-uniform bound sqrt(6 / (64 + 192))
    bound = math.sqrt(6 / (64 + 192))
    assert fc1.abs().max() <= bound and fc1.abs().max() > 0.95 * bound  # of 12288 uniform draws
    assert torch.equal(model.backbone.blocks[0].mlp.fc1.bias, torch.zeros(192))
    patch = model.backbone.patch_embed.proj.weight  # (64, 3, 4, 4) as a 48 -> 64 Linear
    bound = math.sqrt(6 / (48 + 64))
    assert patch.abs().max() <= bound and patch.abs().max() > 0.9 * bound
    pred = model.decoder.pred.weight  # (48, 32)
    assert pred.abs().max() > 0.9 * math.sqrt(6 / (32 + 48))
    assert 0.01 < model.backbone.cls_token.std() < 0.03 and 0.01 < model.decoder.mask_token.std() < 0.03
    norms = [m for m in model.decoder.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 2 + 1 and all(m.eps == 1e-6 for m in norms)  # 2 per block x 2 blocks + the final norm


def test_patchify_layout_and_roundtrip():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    patches = patchify(images, 4)
    assert patches.shape == (2, 4, 48)
    # patch 1 = top-right 4x4 block, pixels ordered (row, col, channel)
    assert patches[0, 1, :3].tolist() == [images[0, c, 0, 4].item() for c in range(3)]
    assert torch.equal(unpatchify(patches, 4, (2, 2), 3), images)
    pixel_mask = token_mask_to_pixels(torch.tensor([[False, True, False, False]]), (2, 2), 4)
    assert pixel_mask[0, 0, :4, 4:].eq(1).all() and pixel_mask.sum() == 16


# --- losses only on masked pixels ------------------------------------------------------------------
def test_simmim_l1_ignores_visible_pixels():
    torch.manual_seed(0)
    target, prediction = _images(2), _images(2, seed=1)
    mask = simmim_mask(2, (8, 8), 2, 0.6)
    pixel_mask = token_mask_to_pixels(mask, (8, 8), 4)
    loss = masked_l1_loss(prediction, target, pixel_mask)
    visible = torch.nonzero(pixel_mask[0, 0] == 0)[0]
    masked = torch.nonzero(pixel_mask[0, 0] == 1)[0]
    for tensor in (target, prediction):
        changed = tensor.clone()
        changed[0, 1, visible[0], visible[1]] += 5.0
        args = (changed, target) if tensor is prediction else (prediction, changed)
        assert torch.equal(masked_l1_loss(*args, pixel_mask), loss)
    changed = target.clone()
    changed[0, 1, masked[0], masked[1]] += 5.0
    assert masked_l1_loss(prediction, changed, pixel_mask) != loss


def test_mae_mse_with_normalised_targets_ignores_visible_pixels():
    torch.manual_seed(0)
    images, prediction = _images(2), torch.randn(2, 64, 48)
    _, _, mask = mae_shuffle(2, 64, 0.75)

    def loss_of(x):
        target, _, _ = normalized_patch_targets(patchify(x, 4))
        return masked_mse_loss(prediction, target, mask)

    loss = loss_of(images)
    visible_token, masked_token = int(torch.nonzero(~mask[0])[0]), int(torch.nonzero(mask[0])[0])
    for token, should_change in ((visible_token, False), (masked_token, True)):
        row, col = divmod(token, 8)
        changed = images.clone()
        changed[0, 0, row * 4 + 1, col * 4 + 2] += 5.0
        assert (loss_of(changed) != loss) == should_change


# --- encoders ----------------------------------------------------------------------------------------
def test_mae_encoder_sees_only_visible_tokens():
    torch.manual_seed(0)
    model = MAEModule(VIT, num_classes=10, image_size=32, backbone_kwargs=VIT_KWARGS).eval()
    seen = []
    model.backbone.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    images = _images(2)
    ids_keep, _, mask = mae_shuffle(2, 64, 0.75)
    latent = encode(model.backbone, images, keep_index=ids_keep)
    assert seen == [torch.Size([2, 1 + 16, 64])]  # class token + 16 of 64 patches
    pixel_mask = token_mask_to_pixels(mask, (8, 8), 4)
    with torch.no_grad():
        hidden_changed = encode(model.backbone, images + 3.0 * pixel_mask, keep_index=ids_keep)
        visible_changed = encode(model.backbone, images + 3.0 * (1 - pixel_mask), keep_index=ids_keep)
    assert torch.allclose(hidden_changed, latent), "masked pixels must not reach the encoder"
    assert not torch.allclose(visible_changed, latent)


def test_unwrapped_encoder_paths_equal_timm_forward():
    torch.manual_seed(0)
    images = _images(2)
    mae = MAEModule(VIT, num_classes=10, image_size=32, backbone_kwargs=VIT_KWARGS).eval()
    all_tokens = torch.arange(64).expand(2, 64)
    with torch.no_grad():
        reference = mae.backbone.forward_features(images)
        assert torch.allclose(encode(mae.backbone, images, keep_index=all_tokens), reference, atol=1e-5)
    swin_kwargs = {"window_size": 4, "depths": (2, 2), "num_heads": (2, 4), "embed_dim": 32}
    beit_kwargs = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "use_abs_pos_emb": False,
                   "use_rel_pos_bias": False, "use_shared_rel_pos_bias": True, "init_values": 0.1}  # SimMIM's ViT
    for name, kwargs in ((VIT, VIT_KWARGS), ("swin_tiny_patch4_window7_224", swin_kwargs),
                         ("beit_base_patch16_224", beit_kwargs)):
        simmim = SimMIMModule(name, num_classes=10, image_size=32, backbone_kwargs=kwargs, mask_patch_size=8).eval()
        nothing_masked = torch.zeros(2, 64, dtype=torch.bool)
        with torch.no_grad():
            features = masked_feature_map(simmim.backbone, images, nothing_masked, simmim.mask_token)
            reference = simmim.backbone.forward_features(images)
        if reference.ndim == 3:  # ViT: drop the class token, tokens -> map
            reference = reference[:, 1:].transpose(1, 2).reshape(features.shape)
        else:  # Swin: NHWC -> NCHW
            reference = reference.permute(0, 3, 1, 2)
        assert torch.allclose(features, reference, atol=1e-5), name
        out = simmim.reconstruct(images)
        assert out["prediction"].shape == images.shape and torch.isfinite(out["loss"])


def test_teacher_from_classifier_checkpoint_and_tokens_on_student_grid(tmp_path):
    torch.manual_seed(0)
    classifier = ClassificationModule(VIT, num_classes=10, image_size=32, backbone_kwargs={"patch_size": 8, "depth": 1})
    torch.save({"state_dict": classifier.state_dict()}, tmp_path / "teacher.ckpt")
    teacher = frozen_encoder(VIT, 32, str(tmp_path / "teacher.ckpt"), {"patch_size": 8, "depth": 1})
    own = classifier.backbone.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in teacher.state_dict().items())  # every weight but the head
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    images = _images(2)
    assert teacher_tokens(teacher, images, (8, 8)).shape == (2, 64, 64)  # 4x4 teacher grid resampled to 8x8
    cnn = frozen_encoder("test_resnet", 32)
    assert teacher_tokens(cnn, images, (8, 8)).shape == (2, 64, cnn.num_features)
    with pytest.raises(ConfigError, match="blocks"):
        frozen_encoder(VIT, 32, str(tmp_path / "teacher.ckpt"), {"patch_size": 8, "depth": 2})


# --- training: teacher frozen, checkpoint -> fine-tune / linear probe handoff ------------------------
def _fit(model: pl.LightningModule, root, steps: int = 2):
    data = NamedTensors(_images(16, seed=3), torch.randint(0, 10, (16,)))
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1, default_root_dir=root,
    )
    trainer.fit(model, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    return trainer


def _mr_mae() -> MRMAEModule:
    return MRMAEModule(VIT, num_classes=10, image_size=32, backbone_kwargs=VIT_KWARGS, teacher=VIT,
                       teacher_kwargs={"patch_size": 8, "depth": 1}, decoder_dim=32, decoder_depth=1, decoder_heads=2)


def test_mr_mae_teacher_frozen_through_fit_and_out_of_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = _mr_mae()
    teacher = model.teachers[0]  # one teacher: the simple case, from the single-teacher keys
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = model.backbone.blocks[0].attn.qkv.weight.clone()
    trainer = _fit(model, tmp_path)
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    assert not torch.equal(model.backbone.blocks[0].attn.qkv.weight, student_before), "the student trains"
    model.train()
    assert not teacher.training, "train() keeps the teacher in eval mode"
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    assert {id(p) for p in model.projections.parameters()} <= optimized
    path = tmp_path / "mr_mae.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["state_dict"]
    assert not [k for k in saved if k.startswith("teachers.")] and "projections.0.weight" in saved
    restored = MRMAEModule.load_from_checkpoint(path)  # the teacher is rebuilt from its config
    assert torch.equal(restored.backbone.blocks[0].attn.qkv.weight, model.backbone.blocks[0].attn.qkv.weight)


def test_mr_mae_several_teachers_each_with_its_normalisation_projection_and_weight(tmp_path):
    torch.manual_seed(0)
    student_stats, clip_stats = ((0.3, 0.3, 0.3), (0.4, 0.4, 0.4)), ((0.48, 0.46, 0.41), (0.27, 0.26, 0.28))
    teachers = [MimicTeacher(VIT, kwargs={"patch_size": 8, "depth": 1}, mean=clip_stats[0], std=clip_stats[1], weight=0.5),
                MimicTeacher("test_resnet", weight=2.0, projection_dim=16)]  # no stats: the student's input
    model = MRMAEModule(VIT, num_classes=10, image_size=32, backbone_kwargs=VIT_KWARGS, teachers=teachers,
                        input_mean=student_stats[0], input_std=student_stats[1], mimic_weight=0.7,
                        decoder_dim=32, decoder_depth=1, decoder_heads=2)
    raw = torch.rand(2, 3, 32, 32)
    images = (raw - 0.3) / 0.4  # what the data hands the student
    seen = []
    for stem in (model.teachers[0].patch_embed, model.teachers[1].conv1):  # what each teacher is fed
        stem.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        out = model.reconstruct(images, fixed_generator("cpu", 0))
    out = {k: v.item() if k.endswith("loss") else v for k, v in out.items()}
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in clip_stats)
    assert torch.allclose(seen[0], (raw - mean) / std, atol=1e-5) and torch.equal(seen[1], images)
    assert out["mimic_loss"] == pytest.approx(out["mimic0_loss"] + out["mimic1_loss"])
    assert out["loss"] == pytest.approx(out["recon_loss"] + 0.7 * out["mimic_loss"])
    # the weights: each term is its teacher's weight x its own MSE
    visible = out["latent"][:, 1:]
    with torch.no_grad():
        target = gather_tokens(teacher_tokens(model.teachers[1], images, (8, 8)), out["ids_keep"])
        mse = torch.nn.functional.mse_loss(model.projections[1](visible), torch.nn.functional.layer_norm(target, target.shape[-1:]))
    assert out["mimic1_loss"] == pytest.approx(2.0 * mse.item(), rel=1e-5)
    assert isinstance(model.projections[1], torch.nn.Sequential) and isinstance(model.projections[0], torch.nn.Linear)
    trainer = _fit(model, tmp_path, steps=1)
    path = tmp_path / "two_teachers.ckpt"
    trainer.save_checkpoint(path)
    ckpt = load_checkpoint(path)  # weights_only=True: the teacher list is stored as plain dicts
    assert not [k for k in ckpt["state_dict"] if k.startswith("teachers.")]
    assert ckpt["hyper_parameters"]["teachers"][0]["weight"] == 0.5
    restored = MRMAEModule.load_from_checkpoint(path)
    assert [s.weight for s in restored.specs] == [0.5, 2.0]
    assert torch.equal(restored.projections[1][0].weight, model.projections[1][0].weight)


@pytest.mark.parametrize("technique", ["simmim", "mae", "mr_mae"])
def test_pretraining_checkpoint_finetunes_and_probes_with_every_encoder_weight(technique, tmp_path):
    torch.manual_seed(0)
    common = dict(num_classes=10, image_size=32, backbone_kwargs=VIT_KWARGS)
    model = {"simmim": lambda: SimMIMModule(VIT, mask_patch_size=8, **common),
             "mae": lambda: MAEModule(VIT, decoder_dim=32, decoder_depth=1, decoder_heads=2, **common),
             "mr_mae": _mr_mae}[technique]()
    trainer = _fit(model, tmp_path, steps=1)
    path = tmp_path / "pretrain.ckpt"
    trainer.save_checkpoint(path)
    encoder = {k: v for k, v in model.backbone.state_dict().items() if not k.startswith("head.")}

    # Fine-tune on 3 classes: a new head, every other weight from the checkpoint.
    finetune = ClassificationModule(VIT, num_classes=3, image_size=32, backbone_kwargs=VIT_KWARGS,
                                    init_checkpoint=str(path), drop_path_rate=0.1)
    loaded = finetune.backbone.state_dict()
    assert set(loaded) - set(encoder) == {"head.weight", "head.bias"}
    assert all(torch.equal(loaded[k], v) for k, v in encoder.items())

    probe = LinearProbeModule(VIT, num_classes=3, image_size=32, init_checkpoint=str(path), backbone_kwargs=VIT_KWARGS)
    assert all(torch.equal(probe.backbone.state_dict()[k], v) for k, v in encoder.items())
    assert {n for n, p in probe.named_parameters() if p.requires_grad} == {"head.1.weight", "head.1.bias"}

    # A different architecture fails loudly, naming the weights.
    with pytest.raises(ConfigError, match=r"blocks\.2"):
        ClassificationModule(VIT, num_classes=3, image_size=32, backbone_kwargs={"patch_size": 4, "depth": 3},
                             init_checkpoint=str(path))


# --- the CLI, end to end -------------------------------------------------------------------------------
def _image_tags(log_dir) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in log_dir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"images": 0})
        accumulator.Reload()
        tags |= set(accumulator.Tags()["images"])
    return tags


@pytest.mark.slow
@pytest.mark.parametrize("technique", ["simmim", "mr_mae"])  # mae: the pretrain -> transfer test below
def test_debug_config_fast_dev_run(technique, run_cli, tmp_path, beton_cache):
    root = tmp_path / technique
    code = run_cli(cli_args(root, beton_cache, "--trainer.fast_dev_run", "true", model=f"{technique}/debug.yaml"))
    assert code == 0


@pytest.mark.slow
def test_cli_pretrain_then_linear_probe_and_finetune(run_cli, tmp_path, beton_cache):
    pretrain = tmp_path / "mae"
    assert run_cli(cli_args(pretrain, beton_cache, model="mae/debug.yaml")) == 0
    checkpoint = pretrain / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    assert "mim/recon" in _image_tags(pretrain), "the input / masked / reconstruction grid is logged"
    probe = cli_args(tmp_path / "probe", beton_cache, "--model.init_args.init_checkpoint", str(checkpoint),
                     model="linear_probe/debug.yaml")
    assert run_cli(probe) == 0
    finetune = cli_args(tmp_path / "finetune", beton_cache, "--model.init_args.init_checkpoint", str(checkpoint),
                        "--data.init_args.train_limit", "256", "--data.init_args.val_limit", "128",
                        "--data.init_args.batch_size", "32", model="mae/finetune.yaml")
    assert run_cli(finetune) == 0
