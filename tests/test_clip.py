"""CLIP: loss value/symmetry, temperature clamp, DDP gathering and local loss, accumulation with feature caching,
token keeping (FLIP count, A-CLIP all-layer attention, view cropping, EMA momentum), zero-shot, recall, data, CLI."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from datamodules.captions import CaptionsFile, ClassPrompts
from modules.components.clip.loss import accumulated_contrastive_backward, split_micro_batches
from modules.components.contrastive import (
    LogitScale, attentive_keep_index, clip_loss, contrastive_loss_from_logits, cosine_momentum, crop_to_boxes,
    crop_token_scores, gather_features, num_kept, random_keep_index, recall_at_k, sample_crop_boxes,
    zero_shot_head, zero_shot_logits,
)
from modules.components.masked_vit import cls_attention, encode_pooled
from tests.conftest import cli_args, ffcv_data, torchvision_data


def _features(n: int = 8, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1), F.normalize(torch.randn(n, d, generator=g), dim=1)


# --- loss and temperature ------------------------------------------------------------------------
def test_loss_value_on_hand_built_matrix():
    logits = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    image_to_text = (math.log(1 + math.exp(-2)) + math.log(2)) / 2  # rows: targets 0, 1
    text_to_image = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-1))) / 2  # columns [2,1] and [0,1]
    expected = (image_to_text + text_to_image) / 2
    assert contrastive_loss_from_logits(logits).item() == pytest.approx(expected, abs=1e-6)
    # Features whose cosine matrix is that matrix / scale give the same loss through clip_loss.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [0.5, 0.5]]) * 2
    assert clip_loss(images, texts, torch.tensor(1.0)).item() == pytest.approx(expected, abs=1e-6)


def test_loss_is_symmetric_and_pair_order_invariant():
    images, texts = _features()
    scale = torch.tensor(14.0)
    loss = clip_loss(images, texts, scale)
    assert clip_loss(texts, images, scale).item() == pytest.approx(loss.item(), abs=1e-6)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    assert clip_loss(images[perm], texts[perm], scale).item() == pytest.approx(loss.item(), abs=1e-6)
    # Breaking the pairing (a bug in the targets) changes it.
    assert clip_loss(images, texts[perm], scale).item() != pytest.approx(loss.item(), abs=1e-3)
    # Perfectly aligned pairs at a high scale give a near-zero loss.
    assert clip_loss(images, images, torch.tensor(100.0)).item() < clip_loss(images, texts, torch.tensor(100.0)).item()


def test_temperature_init_and_clamp():
    scale = LogitScale()
    assert scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        scale.log_scale.fill_(10.0)  # e^10 >> 100
    assert scale().item() == pytest.approx(100.0)
    scale.clamp_()
    assert scale.log_scale.item() == pytest.approx(math.log(100.0))
    with torch.no_grad():
        scale.log_scale.fill_(-3.0)
    scale.clamp_()
    assert scale().item() == pytest.approx(1.0)  # never below 1 either (open_clip's clamp)


# --- DDP -----------------------------------------------------------------------------------------
def _ddp_worker(rank: int, world_size: int, init_file: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        images, texts = _features(8)
        shard = slice(rank * 4, (rank + 1) * 4)
        local_images = images[shard].clone().requires_grad_(True)
        local_texts = texts[shard].clone().requires_grad_(True)
        log_scale = torch.tensor(math.log(10.0), requires_grad=True)
        all_images, all_texts = gather_features(local_images, local_texts)
        loss = clip_loss(all_images, all_texts, log_scale.exp())
        loss.backward()
        out[rank] = (loss.item(), local_images.grad.clone(), local_texts.grad.clone(), log_scale.grad.item())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gathered_loss_equals_single_process_loss(tmp_path):
    images, texts = _features(8)
    images.requires_grad_(True)
    texts.requires_grad_(True)
    log_scale = torch.tensor(math.log(10.0), requires_grad=True)
    single = clip_loss(images, texts, log_scale.exp())
    single.backward()
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    for rank in range(2):
        loss, image_grad, text_grad, scale_grad = out[rank]
        assert loss == pytest.approx(single.item(), abs=1e-6)
        shard = slice(rank * 4, (rank + 1) * 4)
        # DDP averages over 2 ranks: the local shard carries 2x its gradient, so the average is exact.
        torch.testing.assert_close(image_grad / 2, images.grad[shard])
        torch.testing.assert_close(text_grad / 2, texts.grad[shard])
        assert scale_grad == pytest.approx(log_scale.grad.item(), abs=1e-6)


@pytest.mark.slow
def test_local_loss_gives_the_full_batch_gradient_on_two_processes(tmp_path):
    """open_clip's local_loss: own rows vs gathered features on each rank; DDP's average = full-batch gradient."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from clip_ddp_script import data  # noqa: E402

    out = tmp_path / "ddp.pt"
    script = Path(__file__).resolve().parent / "clip_ddp_script.py"
    subprocess.run([sys.executable, str(script), str(out)], check=True, timeout=300)
    result = torch.load(out, weights_only=True)
    model, images, texts = data()
    image_features, text_features, scale = model(images, texts)
    full = clip_loss(image_features, text_features, scale)
    full.backward()
    # float64; the loss sums 8x8 logits: a few hundred eps of headroom.
    tolerance = dict(atol=1e3 * torch.finfo(torch.float64).eps, rtol=1e3 * torch.finfo(torch.float64).eps)
    local, gathered = result[True], result[False]
    assert local["losses"][0] != pytest.approx(local["losses"][1])  # each rank's own rows only
    assert sum(local["losses"]) / 2 == pytest.approx(full.item(), abs=1e-12)
    assert gathered["losses"] == pytest.approx([full.item()] * 2, abs=1e-12)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(local["grads"][name], parameter.grad, **tolerance)
        torch.testing.assert_close(gathered["grads"][name], parameter.grad, **tolerance)


# --- gradient accumulation with feature caching ----------------------------------------------------
def test_feature_cached_accumulation_equals_one_big_batch_gradient():
    """k micro-batches of b with cached features give the parameter gradient of one batch of k * b."""
    module = _tiny_clip().double()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float64)
    tokens = torch.randint(1, 100, (8, 6), generator=g)
    model = module.model
    full = clip_loss(model.encode_image(images), model.encode_text(tokens), model.logit_scale())
    full.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    micro = split_micro_batches([images, tokens], 4)
    encode = lambda j: (model.encode_image(micro[j][0]), model.encode_text(micro[j][1]))  # noqa: E731
    loss = accumulated_contrastive_backward(encode, 4, model.logit_scale, clip_loss)
    assert loss.item() == pytest.approx(full.item(), abs=1e-12)
    tolerance = dict(atol=1e4 * torch.finfo(torch.float64).eps, rtol=1e4 * torch.finfo(torch.float64).eps)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], **tolerance, msg=name)
    # Plain accumulation (each micro-batch its own loss, no cached negatives) is a different gradient.
    model.zero_grad()
    for part_images, part_tokens in micro:
        (clip_loss(model.encode_image(part_images), model.encode_text(part_tokens), model.logit_scale()) / 4).backward()
    assert not torch.allclose(model.image_projection.weight.grad, expected["image_projection.weight"])
    with pytest.raises(ValueError, match="micro-batches"):
        split_micro_batches([images], 3)


def test_accum_freq_step_through_lightning_equals_the_full_batch_step(tmp_path):
    """Manual optimization with accum_freq=4: one SGD step on a batch of 8 = the automatic step on it."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from modules.components.optim import OptimConfig

    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 100, (8, 6), generator=g)
    dataset = [{"image": images[i], "tokens": tokens[i]} for i in range(8)]  # batches by name (collated dicts)
    weights = {}
    for accum_freq in (1, 4):
        optim = OptimConfig(name="momentum", lr=0.5, momentum=0.0, weight_decay=0.0, warmup_epochs=0, min_lr_ratio=1.0)
        module = _tiny_clip(optim=optim, accum_freq=accum_freq)
        assert module.automatic_optimization == (accum_freq == 1)
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, precision="64-true", logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0, default_root_dir=tmp_path)
        trainer.fit(module, DataLoader(dataset, batch_size=8))
        assert trainer.global_step == 2
        weights[accum_freq] = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    tolerance = dict(atol=1e4 * torch.finfo(torch.float64).eps, rtol=1e4 * torch.finfo(torch.float64).eps)
    for name, value in weights[1].items():
        torch.testing.assert_close(weights[4][name], value, **tolerance, msg=name)
    with pytest.raises(Exception, match="accum_freq"):
        _tiny_clip(accum_freq=0)


@pytest.mark.slow
def test_accum_freq_with_local_loss_under_lightning_ddp_equals_one_process(tmp_path):
    """2 gloo ranks x (2 micro-batches of 2) with local_loss = one process on the global batch of 8 (2 SGD steps)."""
    script = Path(__file__).resolve().parent / "clip_lightning_ddp_script.py"
    for name, extra in (("single", []), ("ddp", ["--devices", "2", "--accum-freq", "2", "--local-loss"])):
        subprocess.run([sys.executable, str(script), str(tmp_path / name), *extra], check=True, timeout=600)
    single = torch.load(tmp_path / "single" / "weights.pt", weights_only=True)
    ddp = torch.load(tmp_path / "ddp" / "weights.pt", weights_only=True)
    tolerance = dict(atol=1e6 * torch.finfo(torch.float64).eps, rtol=1e6 * torch.finfo(torch.float64).eps)
    for name, value in single.items():
        torch.testing.assert_close(ddp[name], value, **tolerance, msg=name)


# --- token keeping -------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens,ratio,kept", [(64, 0.0, 64), (64, 0.5, 32), (64, 0.75, 16), (64, 0.9, 6),
                                               (49, 0.5, 24), (10, 0.25, 7), (196, 0.75, 49), (4, 0.9, 1)])
def test_random_keep_exact_count(tokens, ratio, kept):
    # FLIP keeps int(N * (1 - ratio)): 49 * 0.5 = 24.5 -> 24 (rounding the dropped count kept 25), 7.5 -> 7.
    assert num_kept(tokens, ratio) == kept
    index = random_keep_index(5, tokens, kept, generator=torch.Generator().manual_seed(0))
    assert index.shape == (5, kept)
    for row in index:
        assert row.unique().numel() == kept and bool((row.diff() > 0).all()) and int(row.max()) < tokens
    assert not torch.equal(index[0], index[1]) or kept in (1, tokens)  # per-sample draws


def test_attentive_keeps_highest_scored_tokens():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.0, 0.5], [0.6, 0.1, 0.2, 0.3, 0.9, 0.05]])
    index = attentive_keep_index(scores, num_kept(6, 0.5))
    assert index.tolist() == [[1, 3, 5], [0, 3, 4]]
    with pytest.raises(ValueError):
        num_kept(10, 1.0)


def _reference_block_mask(attention: torch.Tensor, keep_ratio: float = 0.5) -> torch.Tensor:
    """A-CLIP's get_att_mask, restated: 14x14 scores -> bilinear 7x7, top int(49 * ratio) + 1 blocks unmasked,
    each block's 2x2 tokens take its mask. True = dropped.  # (B, 196)"""
    batch = attention.shape[0]
    pooled = F.interpolate(attention.view(batch, 1, 14, 14), (7, 7), mode="bilinear").view(batch, 49)
    top = pooled.argsort(dim=1, descending=True)[:, : int(49 * keep_ratio) + 1]
    blocks = torch.ones(batch, 49, dtype=torch.bool).scatter_(1, top, False).view(batch, 7, 7)
    return blocks.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).reshape(batch, 196)


def test_attentive_block_selection_matches_the_reference_and_extends_to_other_grids():
    from modules.components.clip.token_masking import attentive_block_keep_index, kept_blocks

    scores = torch.rand(3, 196, generator=torch.Generator().manual_seed(0))  # distinct scores: no ties
    index = attentive_block_keep_index(scores, (14, 14), 0.5)
    assert index.shape == (3, 100)  # 25 blocks of 4 tokens, not the 98 single tokens
    dropped = torch.ones(3, 196, dtype=torch.bool).scatter_(1, index, False)
    assert torch.equal(dropped, _reference_block_mask(scores))
    assert [kept_blocks(16, 0.5), kept_blocks(16, 0.25), kept_blocks(49, 0.5), kept_blocks(4, 1.0)] == [9, 5, 25, 4]
    # 8x8 (the benchmark): 16 blocks; block (r, c) holds tokens 16r + 2c + {0, 1, 8, 9}
    block_scores = torch.arange(16.0)  # block 15 best, then 14, ...
    grid_scores = block_scores.view(4, 4).repeat_interleave(2, 0).repeat_interleave(2, 1).reshape(1, 64)
    kept = attentive_block_keep_index(grid_scores, (8, 8), 0.25)  # 5 blocks: 15, 14, 13, 12, 11
    expected = sorted(16 * (b // 4) + 2 * (b % 4) + d for b in (11, 12, 13, 14, 15) for d in (0, 1, 8, 9))
    assert kept.tolist() == [expected]
    # 7x7 (odd): 4x4 blocks, the last row and column partial; 9 of 16 blocks at keep 0.5 -> K = 49 * 9 // 16 = 27
    # tokens, taken block by block. Token value = its index: block means (3,3) 48, (3,2) 46.5, (3,1) 44.5, (3,0) 42.5,
    # (2,3) 37.5, (2,2) 36, (2,1) 34, (2,0) 32 hold tokens 28-48 (21), then (1,3) 23.5 adds 20, 27 and (1,2) 22
    # adds 18, 19, 25, 26.
    odd = attentive_block_keep_index(torch.arange(49.0).view(1, 49), (7, 7), 0.5)
    assert odd.tolist() == [sorted([*range(28, 49), 20, 27, 18, 19, 25, 26])]
    with pytest.raises(Exception, match="selection"):
        _attentive(0.5, selection="token")


@pytest.fixture(scope="module")
def vit():
    from modules.components.backbones import create_backbone

    torch.manual_seed(0)
    return create_backbone("test_vit", num_classes=0, image_size=32, patch_size=4, depth=2).eval()


def test_vit_encode_unmasked_path_equals_timm_and_drops_tokens(vit):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(encode_pooled(vit, images), vit(images))
        every = torch.arange(64).expand(2, -1)
        torch.testing.assert_close(encode_pooled(vit, images, every), vit(images))
        # Changing pixels of a dropped patch leaves the features unchanged; a kept one changes them.
        keep = torch.tensor([[1, 2, 3, 5], [0, 10, 20, 30]])
        before = encode_pooled(vit, images, keep)
        edited = images.clone()
        edited[:, :, 0:4, 16:20] += 5  # patch 4 (row 0, col 4): dropped for both samples
        torch.testing.assert_close(encode_pooled(vit, edited, keep), before)
        edited[:, :, 0:4, 4:8] += 5  # patch 1: kept by sample 0 only
        after = encode_pooled(vit, edited, keep)
        assert not torch.allclose(after[0], before[0]) and torch.allclose(after[1], before[1])


def test_cls_attention_scores_are_a_distribution_over_patches(vit):
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    scores = cls_attention(vit, images)
    assert scores.shape == (3, 64)
    assert bool((scores > 0).all()) and bool((scores.sum(1) < 1).all())  # the rest goes to [CLS] itself


def _timm_attention_stack(vit, images) -> torch.Tensor:
    """(layers, B, H, L, L) attention probabilities read from timm's own unfused attention path."""
    stack, hooks = [], []
    for block in vit.blocks:
        block.attn.fused_attn = False
        hooks.append(block.attn.attn_drop.register_forward_hook(lambda m, i, o: stack.append(o.detach())))
    try:
        with torch.no_grad():
            vit(images)
    finally:
        for block, hook in zip(vit.blocks, hooks):
            hook.remove()
            block.attn.fused_attn = True
    return torch.stack(stack)


def test_cls_attention_averages_heads_and_all_layers_like_a_clip():
    from modules.components.backbones import create_backbone

    torch.manual_seed(0)
    vit = create_backbone("test_vit", num_classes=0, image_size=32, patch_size=4, depth=3).eval()
    with torch.no_grad():
        for block in vit.blocks:  # peaked attention (a random init's is nearly uniform, 1/65 everywhere)
            block.attn.qkv.weight.mul_(6.0)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    stack = _timm_attention_stack(vit, images)  # (3, B, H, 65, 65)
    # A-CLIP: mean over layers of the attention matrices, [CLS] row on the patches, mean over heads.
    expected = stack.mean(0)[:, :, 0, 1:].mean(1)  # (B, 64)
    tolerance = dict(atol=64 * torch.finfo(torch.float32).eps, rtol=0)  # softmax weights <= 1, length 65 sums
    torch.testing.assert_close(cls_attention(vit, images), expected, **tolerance)
    last_only = stack[-1][:, :, 0, 1:].mean(1)
    torch.testing.assert_close(cls_attention(vit, images, num_layers=1), last_only, **tolerance)
    assert (expected - last_only).abs().max() > 100 * tolerance["atol"]  # the layers really differ
    with pytest.raises(ValueError):
        cls_attention(vit, images, num_layers=4)


def test_token_scores_of_the_full_view_are_cropped_to_the_online_view():
    scores = torch.arange(16.0).view(1, 16)  # a 4x4 grid, row-major
    top_left = torch.tensor([[0.0, 0.0, 0.5, 0.5]])  # (top, left, height, width) of the full view
    # The 2x2 output cells' centres fall on the centres of the full view's top-left 2x2 cells.
    cropped = crop_to_boxes(scores.view(1, 1, 4, 4), top_left, (2, 2)).flatten(1)
    assert cropped.tolist() == [[0.0, 1.0, 4.0, 5.0]]
    bottom_right = crop_to_boxes(scores.view(1, 1, 4, 4), torch.tensor([[0.5, 0.5, 0.5, 0.5]]), (2, 2))
    assert bottom_right.flatten().tolist() == [10.0, 11.0, 14.0, 15.0]
    # Same grid size: the full box is the identity; the top-left quarter upsampled 2x puts cell (0, 0)'s value
    # at output cell (0, 0) and halfway values between cells 0 and 1 (bilinear, cell centres).
    torch.testing.assert_close(crop_token_scores(scores, (4, 4), torch.tensor([[0.0, 0.0, 1.0, 1.0]])), scores)
    zoomed = crop_token_scores(scores, (4, 4), top_left).view(4, 4)  # centres -0.25, 0.25, 0.75, 1.25 in cells
    assert zoomed[0, 0].item() == 0.0 and zoomed[0, 1].item() == pytest.approx(0.25)
    assert zoomed[1, 1].item() == pytest.approx(0.25 + 4 * 0.25)
    boxes = sample_crop_boxes(1000, (0.5, 1.0), generator=torch.Generator().manual_seed(0))
    area = boxes[:, 2] * boxes[:, 3]
    assert bool((boxes[:, :2] >= 0).all()) and bool((boxes[:, :2] + boxes[:, 2:] <= 1 + 1e-6).all())
    assert 0.45 <= float(area.min()) and float(area.max()) <= 1.0 and float(area.mean()) > 0.6


def _tiny_clip(**kwargs):
    from modules.clip import CLIPModule

    torch.manual_seed(0)
    defaults = dict(embed_dim=16, text_width=16, text_depth=1, text_heads=2, vocab_size=100)
    return CLIPModule("test_vit", 3, 32, {"patch_size": 4, "depth": 2}, **{**defaults, **kwargs})


def _attentive(ratio=0.75, **kwargs):
    from modules.components.clip.token_masking import AttentiveMasking

    return AttentiveMasking(ratio, **kwargs)


def _random(ratio=0.5):
    from modules.components.clip.token_masking import RandomMasking

    return RandomMasking(ratio)


def test_attentive_module_scores_the_full_view_and_keeps_top_tokens_of_the_crop():
    from modules.components.clip.token_masking import attentive_block_keep_index

    module = _tiny_clip(masking=_attentive(0.75))
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(5)
    view, index = module.masked_view(images)
    torch.manual_seed(5)
    boxes = sample_crop_boxes(2, (0.5, 1.0))
    scores = cls_attention(module.masking.ema.module, images)  # all layers, on the full view
    expected = attentive_block_keep_index(crop_token_scores(scores, (8, 8), boxes), (8, 8), 0.25)
    assert torch.equal(index, expected) and index.shape == (2, 20)  # 5 of 16 blocks (A-CLIP's int(16 x 0.25) + 1)
    torch.testing.assert_close(view, crop_to_boxes(images, boxes, (32, 32)))
    assert not torch.allclose(view, images)
    same_view = _tiny_clip(masking=_attentive(0.75, online_crop_scale=(1.0, 1.0), attention_layers=1))
    view, index = same_view.masked_view(images)
    assert view is images  # this project's earlier scorer: same view, last block
    last_block = cls_attention(same_view.masking.ema.module, images, num_layers=1)
    assert torch.equal(index, attentive_block_keep_index(last_block, (8, 8), 0.25))
    single = _tiny_clip(masking=_attentive(0.75, online_crop_scale=(1.0, 1.0), attention_layers=1, selection="tokens"))
    single.masking.ema.module.load_state_dict(same_view.masking.ema.module.state_dict())
    _, index = single.masked_view(images)  # the named option: the top int(64 x 0.25) = 16 single tokens
    assert torch.equal(index, last_block.topk(16, dim=1).indices.sort(1).values)
    optimised = {id(p) for p in module.trainable_parameters()}
    assert not any(id(p) in optimised for p in module.masking.parameters())
    assert id(module.model.logit_scale.log_scale) in optimised
    from modules.clip import CLIPModule
    with pytest.raises(Exception, match="ViT"):
        CLIPModule("test_resnet", 3, 32, masking=_random(0.5), vocab_size=100, text_width=16, text_heads=2)


def test_ema_momentum_follows_a_cosine_from_0996_to_1():
    from types import SimpleNamespace

    assert cosine_momentum(0, 1000) == pytest.approx(0.996, abs=1e-12)
    assert cosine_momentum(500, 1000) == pytest.approx(0.998, abs=1e-12)
    assert cosine_momentum(1000, 1000) == pytest.approx(1.0, abs=1e-12)
    assert cosine_momentum(250, 1000) == pytest.approx(1 - 0.004 * (1 + math.cos(math.pi / 4)) / 2, abs=1e-12)
    module = _tiny_clip(masking=_attentive(0.5))
    module._trainer = SimpleNamespace(estimated_stepping_batches=200, global_step=0, training=True)
    assert module.masking.momentum(module.global_step, module.total_steps()) == pytest.approx(0.996)
    module._trainer.global_step = 100
    assert module.masking.momentum(module.global_step, module.total_steps()) == pytest.approx(0.998)
    # The update uses it: after the last step the scorer no longer moves.
    module._trainer.global_step = 200
    live, ema = module.model.image_encoder, module.masking.ema
    before = [p.clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in live.parameters():
            p.add_(1.0)
    module.on_train_batch_end(None, None, 0)
    for a, b in zip(ema.module.parameters(), before):
        torch.testing.assert_close(a, b)
    module._trainer.global_step = 100
    module.on_train_batch_end(None, None, 0)  # momentum 0.998: 0.2% of the +1 shift
    torch.testing.assert_close(next(ema.module.parameters()), before[0] + 0.002, atol=1e-6, rtol=0)


def test_attentive_scorer_timm_warmup_is_an_option():
    module = _tiny_clip(masking=_attentive(0.5, ema_decay=0.999, ema_warmup=True))
    live, ema = module.model.image_encoder, module.masking.ema
    with torch.no_grad():
        for p in live.parameters():
            p.add_(1.0)
    ema.update(live, step=1)  # first update: decay 0, the scorer becomes the live encoder
    for a, b in zip(ema.module.parameters(), live.parameters()):
        torch.testing.assert_close(a, b)
    assert ema.get_decay(10) < 0.9 < ema.get_decay(10_000) <= 0.999  # then ramps up to ema_decay


def test_unmasked_tuning_sees_every_token_in_the_final_share_of_steps():
    from types import SimpleNamespace

    from modules.clip import CLIPModule

    module = _tiny_clip(masking=_random(0.5), unmasked_tuning=0.25)
    images = torch.randn(2, 3, 32, 32)
    module._trainer = SimpleNamespace(estimated_stepping_batches=100, global_step=74, training=True)
    assert module.keep_index(images).shape == (2, 32)
    module._trainer.global_step = 75
    assert module.keep_index(images) is None
    module._trainer.training = False  # validate/test: the module's own masking rule, no step count needed
    assert module.keep_index(images).shape == (2, 32)
    with pytest.raises(Exception, match="unmasked_tuning"):
        CLIPModule("test_vit", 3, 32, {"patch_size": 4}, vocab_size=100, text_width=16, text_heads=2, unmasked_tuning=2)


# --- zero-shot and retrieval ---------------------------------------------------------------------
def test_zero_shot_head_classifies_separable_set_perfectly():
    g = torch.Generator().manual_seed(0)
    classes, templates, dim = 4, 3, 8
    centres = torch.eye(dim)[:classes] * 3
    prompts = centres[:, None, :] + 0.3 * torch.randn(classes, templates, dim, generator=g)  # (C, T, D)
    head = zero_shot_head(prompts)
    torch.testing.assert_close(head.norm(dim=1), torch.ones(classes))
    labels = torch.arange(classes).repeat(10)
    images = centres[labels] + 0.3 * torch.randn(len(labels), dim, generator=g)
    assert torch.equal(zero_shot_logits(images, head).argmax(1), labels)
    # The ensemble averages *normalised* prompts: a huge-norm template cannot dominate its class row.
    prompts[0, 0] = 1000 * torch.eye(dim)[5]
    assert zero_shot_head(prompts)[0, 0] > zero_shot_head(prompts)[0, 5]


def test_recall_at_k_hand_built():
    similarity = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.7, 0.1], [0.1, 0.2, 0.3]])
    ids = torch.tensor([0, 1, 2])
    recall = recall_at_k(similarity, ids, ids, ks=(1, 2))
    assert recall[1].item() == pytest.approx(2 / 3)  # query 1 ranks item 0 first
    assert recall[2].item() == pytest.approx(1.0)
    # Identical captions (same id) all count as matches.
    assert recall_at_k(similarity, torch.tensor([0, 0, 2]), torch.tensor([0, 0, 2]), ks=(1,))[1].item() == 1.0


# --- data ----------------------------------------------------------------------------------------
def test_label_captions_on_the_batch():
    dm = torchvision_data(source="fashion_mnist", val_limit=16, batch_size=8, num_workers=0,
                          batches=ClassPrompts(templates=["a photo of a {}.", "a {} product."], context_length=16))
    assert dm.class_prompt_tokens().shape == (10, 2, 16)
    dm.setup("validate")
    batch = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert sorted(batch) == ["caption_id", "image", "label", "tokens"]
    images, tokens, labels, caption_ids = batch["image"], batch["tokens"], batch["label"], batch["caption_id"]
    assert images.dtype == torch.float32 and tokens.shape == (8, 16)
    expected = dm.batches.tokenizer([f"a photo of a {dm.class_names[c].replace('/', ' or ').lower()}." for c in labels])
    assert torch.equal(tokens, expected)  # validation: first template
    assert torch.equal(caption_ids, labels * 2)


def test_caption_folder_pairs_images_with_their_captions(image_folder, tmp_path):
    files = sorted(p for p in image_folder.rglob("*") if p.is_file())
    captions = tmp_path / "captions.tsv"
    captions.write_text("".join(f"{f.relative_to(image_folder).as_posix()}\timage number {i}\n" for i, f in enumerate(files)))
    number = {f.relative_to(image_folder).as_posix(): i for i, f in enumerate(files)}
    dm = torchvision_data(batches=CaptionsFile(str(captions)), source=str(image_folder), batch_size=4, num_workers=0)
    dm.setup("fit")
    batch = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert sorted(batch) == ["caption_id", "image", "index", "label", "tokens"]
    tokens, caption_ids = batch["tokens"], batch["caption_id"]
    source = dm.get_source("val")
    for row, index in zip(tokens, caption_ids.tolist()):
        text = f"image number {number[source.files[index].relative_to(image_folder).as_posix()]}"
        assert torch.equal(row, dm.batches.tokenizer(text)[0])
    captions.write_text(captions.read_text().splitlines()[0] + "\n")
    from modules.components.errors import DataError
    with pytest.raises(DataError, match="no caption"):
        torchvision_data(batches=CaptionsFile(str(captions)), source=str(image_folder), num_workers=0).setup("fit")


# --- end to end ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_debug_config_runs_through_cli(run_cli, tmp_path, beton_cache):
    root = tmp_path / "run"
    assert run_cli(cli_args(root, beton_cache, model="clip/debug.yaml")) == 0
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)
    state = next(v for k, v in checkpoint["callbacks"].items() if k.startswith(("ModelCheckpoint", "LatestCheckpoint")))
    assert state["monitor"] == "val/zeroshot_acc1" and state["best_model_score"] is not None
    assert 0.0 <= float(state["best_model_score"]) <= 1.0
    assert checkpoint["global_step"] == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(root.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/zeroshot_acc1", "val/i2t_recall@1", "val/i2t_recall@5",
            "val/t2i_recall@1", "val/t2i_recall@5"} <= tags
    assert any(k.startswith("masking.scorer.module.") for k in checkpoint["state_dict"])  # resumes with its scorer


# --- FFCV ImageFolder + captions file ------------------------------------------------------------
def _captions_with_repeats(image_folder, tmp_path) -> tuple:
    """A captions file where every 3rd image has two captions and odd images share one of three texts."""
    files = sorted(p for p in image_folder.rglob("*") if p.is_file())
    per_image = {}
    for i, f in enumerate(files):
        texts = [f"shared caption {i % 3}" if i % 2 else f"image number {i}"]
        if i % 3 == 0:
            texts.append(f"second caption of image {i}")
        per_image[f.relative_to(image_folder).as_posix()] = texts
    path = tmp_path / "captions.tsv"
    path.write_text("# path\tcaption\n" + "".join(f"{key}\t{text}\n" for key, texts in per_image.items() for text in texts))
    return path, per_image


def _ffcv_caption_folder(image_folder, captions, beton_cache, **kwargs):
    dm = ffcv_data(batches=CaptionsFile(str(captions), context_length=16), source=str(image_folder),
                   cache_dir=str(beton_cache), batch_size=8, num_workers=1, val_fraction=0.25, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_ffcv_caption_folder_yields_each_images_captions_like_the_torchvision_one(image_folder, tmp_path, beton_cache):
    captions, per_image = _captions_with_repeats(image_folder, tmp_path)
    dm = _ffcv_caption_folder(image_folder, captions, beton_cache)
    assert dm.class_prompt_tokens().shape == (3, 5, 16)
    source = dm.get_source("val")
    batches = [dm.on_after_batch_transfer(batch, 0) for batch in dm.val_dataloader()]
    images = torch.cat([b["image"] for b in batches])
    tokens, labels, caption_ids = (torch.cat([b[key] for b in batches]) for key in ("tokens", "label", "caption_id"))
    assert images.dtype == torch.float32 and images.shape == (len(source), 3, 32, 32)
    assert tokens.dtype == torch.int64 and tokens.shape == (len(source), 16)
    texts = [per_image[f.relative_to(image_folder).as_posix()][0] for f in source.files]  # validation: first caption
    assert torch.equal(tokens, dm.batches.tokenizer(texts))  # sequential val order = source order = .beton order
    assert torch.equal(labels, torch.as_tensor(source.labels))
    same_text = torch.tensor([[a == b for b in texts] for a in texts])
    assert torch.equal(caption_ids[:, None] == caption_ids[None], same_text)
    assert len(set(texts)) < len(texts)  # the check above saw shared texts

    reference = torchvision_data(batches=CaptionsFile(str(captions), context_length=16), source=str(image_folder),
                                 batch_size=8, num_workers=0, val_fraction=0.25)
    reference.setup("fit")
    expected = [reference.on_after_batch_transfer(batch, 0) for batch in reference.val_dataloader()]
    for key, got in (("tokens", tokens), ("label", labels), ("caption_id", caption_ids)):
        assert torch.equal(torch.cat([b[key] for b in expected]), got)
    assert torch.equal(torch.cat([b["index"] for b in batches]), torch.arange(len(source)))  # in source order


def test_ffcv_caption_folder_training_picks_among_an_images_captions(image_folder, tmp_path, beton_cache):
    captions, per_image = _captions_with_repeats(image_folder, tmp_path)
    dm = _ffcv_caption_folder(image_folder, captions, beton_cache)
    dm.trainer = SimpleNamespace(training=True, global_rank=0, current_epoch=0, world_size=1)  # as under fit
    source = dm.get_source("train")
    seen: dict[int, set[str]] = {}
    text_of_id: dict[int, str] = {}
    decode = {tuple(dm.batches.tokenizer([t])[0].tolist()): t for texts in per_image.values() for t in texts}
    for batch in dm.train_dataloader():
        for _ in range(12):
            named = dm.on_after_batch_transfer(batch, 0)
            tokens, caption_ids = named["tokens"], named["caption_id"]
            for index, row, caption_id in zip(named["index"].tolist(), tokens, caption_ids.tolist()):
                text = decode[tuple(row.tolist())]
                assert text in per_image[source.files[index].relative_to(image_folder).as_posix()]
                assert text_of_id.setdefault(caption_id, text) == text  # one id, one text
                seen.setdefault(index, set()).add(text)
    multi = [i for i in seen if len(per_image[source.files[i].relative_to(image_folder).as_posix()]) == 2]
    assert multi and all(len(seen[i]) == 2 for i in multi)  # both captions drawn over 12 steps
    assert all(len(seen[i]) == 1 for i in seen if i not in multi)


def test_caption_folders_reject_missing_captions(image_folder, tmp_path, beton_cache):
    from modules.components.errors import ConfigError, DataError

    kwargs = dict(source=str(image_folder), cache_dir=str(beton_cache), num_workers=0)
    with pytest.raises(ConfigError, match="not found"):
        dm = ffcv_data(batches=CaptionsFile(str(tmp_path / "absent.tsv")), **kwargs)
        dm.batches.caption_table(dm, "train")
    captions, _ = _captions_with_repeats(image_folder, tmp_path)
    captions.write_text(captions.read_text().splitlines()[1] + "\n")
    with pytest.raises(DataError, match="have no caption"):
        dm = ffcv_data(batches=CaptionsFile(str(captions)), **kwargs)
        dm.batches.caption_table(dm, "train")
    with pytest.raises(ConfigError, match="ImageFolder source"):
        ffcv_data(batches=CaptionsFile(str(captions)), source="fashion_mnist", cache_dir=str(beton_cache))


@pytest.mark.slow
def test_ffcv_caption_folder_config_fits_through_cli(run_cli, tmp_path, beton_cache, image_folder):
    captions, _ = _captions_with_repeats(image_folder, tmp_path)
    tiny = ["--model.init_args.backbone", "test_vit", "--model.init_args.backbone_kwargs", '{"patch_size": 4, "depth": 2}',
            "--model.init_args.embed_dim", "32", "--model.init_args.text_width", "32", "--model.init_args.text_depth", "1",
            "--model.init_args.text_heads", "2"]
    data = ["--data.init_args.source", str(image_folder), "--data.init_args.batches.init_args.captions_file", str(captions),
            "--data.init_args.image_size", "32", "--data.init_args.batch_size", "8",
            "--data.init_args.batches.init_args.context_length", "16",
            "--data.init_args.loader", '{"init_args": {"write_mode": "raw", "max_resolution": null}}']  # see test_prepare_data
    args = cli_args(tmp_path / "run", beton_cache, *tiny, *data, "--trainer.fast_dev_run", "true",
                    model="clip/imagefolder.yaml", data="data/imagefolder.yaml")
    assert run_cli(args) == 0
