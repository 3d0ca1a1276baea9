"""CLIP: loss value/symmetry, temperature clamp, DDP gathering, token keeping, zero-shot, recall, data, CLI."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from modules.components.contrastive import (
    LogitScale, attentive_keep_index, clip_loss, contrastive_loss_from_logits, gather_features, num_kept,
    random_keep_index, recall_at_k, vit_cls_attention, vit_encode, zero_shot_head, zero_shot_logits,
)
from tests.conftest import cli_args


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


# --- token keeping -------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio,kept", [(0.0, 64), (0.5, 32), (0.75, 16), (0.9, 6)])
def test_random_keep_exact_count(ratio, kept):
    assert num_kept(64, ratio) == kept
    index = random_keep_index(5, 64, kept, generator=torch.Generator().manual_seed(0))
    assert index.shape == (5, kept)
    for row in index:
        assert row.unique().numel() == kept and bool((row.diff() > 0).all()) and int(row.max()) < 64
    assert not torch.equal(index[0], index[1]) or kept == 64  # per-sample draws


def test_attentive_keeps_highest_scored_tokens():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.0, 0.5], [0.6, 0.1, 0.2, 0.3, 0.9, 0.05]])
    index = attentive_keep_index(scores, num_kept(6, 0.5))
    assert index.tolist() == [[1, 3, 5], [0, 3, 4]]
    with pytest.raises(ValueError):
        num_kept(10, 1.0)


@pytest.fixture(scope="module")
def vit():
    from modules.components.backbones import create_backbone

    torch.manual_seed(0)
    return create_backbone("test_vit", num_classes=0, image_size=32, patch_size=4, depth=2).eval()


def test_vit_encode_unmasked_path_equals_timm_and_drops_tokens(vit):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(vit_encode(vit, images), vit(images))
        every = torch.arange(64).expand(2, -1)
        torch.testing.assert_close(vit_encode(vit, images, every), vit(images))
        # Changing pixels of a dropped patch leaves the features unchanged; a kept one changes them.
        keep = torch.tensor([[1, 2, 3, 5], [0, 10, 20, 30]])
        before = vit_encode(vit, images, keep)
        edited = images.clone()
        edited[:, :, 0:4, 16:20] += 5  # patch 4 (row 0, col 4): dropped for both samples
        torch.testing.assert_close(vit_encode(vit, edited, keep), before)
        edited[:, :, 0:4, 4:8] += 5  # patch 1: kept by sample 0 only
        after = vit_encode(vit, edited, keep)
        assert not torch.allclose(after[0], before[0]) and torch.allclose(after[1], before[1])


def test_cls_attention_scores_are_a_distribution_over_patches(vit):
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    scores = vit_cls_attention(vit, images)
    assert scores.shape == (3, 64)
    assert bool((scores > 0).all()) and bool((scores.sum(1) < 1).all())  # the rest goes to [CLS] itself


def test_attentive_module_keeps_ema_top_tokens_and_ema_is_not_optimised():
    from modules.clip import CLIPModule

    torch.manual_seed(0)
    module = CLIPModule("test_vit", 3, 32, {"patch_size": 4, "depth": 2}, embed_dim=16, text_width=16,
                        text_depth=1, text_heads=2, vocab_size=100, mask_ratio=0.75, masking="attentive")
    images = torch.randn(2, 3, 32, 32)
    index = module.keep_index(images)
    expected = vit_cls_attention(module.ema_image_encoder.module, images).topk(16, dim=1).indices.sort(1).values
    assert torch.equal(index, expected)
    optimised = {id(p) for p in module.trainable_parameters()}
    assert not any(id(p) in optimised for p in module.ema_image_encoder.parameters())
    assert id(module.model.logit_scale.log_scale) in optimised
    with pytest.raises(Exception, match="ViT"):
        CLIPModule("test_resnet", 3, 32, mask_ratio=0.5, vocab_size=100, text_width=16, text_heads=2)


def test_attentive_scorer_ema_warms_up_from_the_live_encoder():
    from modules.clip import CLIPModule

    torch.manual_seed(0)
    module = CLIPModule("test_vit", 3, 32, {"patch_size": 4, "depth": 2}, embed_dim=16, text_width=16,
                        text_depth=1, text_heads=2, vocab_size=100, mask_ratio=0.5, masking="attentive",
                        ema_decay=0.999)
    live, ema = module.model.image_encoder, module.ema_image_encoder
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

    module = CLIPModule("test_vit", 3, 32, {"patch_size": 4, "depth": 2}, embed_dim=16, text_width=16,
                        text_depth=1, text_heads=2, vocab_size=100, mask_ratio=0.5, unmasked_tuning=0.25)
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
    from datamodules.captions import TorchvisionCaptionDataModule

    dm = TorchvisionCaptionDataModule(source="fashion_mnist", val_limit=16, batch_size=8, num_workers=0,
                                      templates=["a photo of a {}.", "a {} product."], context_length=16)
    assert dm.class_prompt_tokens().shape == (10, 2, 16)
    dm.setup("validate")
    images, tokens, labels, caption_ids = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert images.dtype == torch.float32 and tokens.shape == (8, 16)
    expected = dm.tokenizer([f"a photo of a {dm.class_names[c].replace('/', ' or ').lower()}." for c in labels])
    assert torch.equal(tokens, expected)  # validation: first template
    assert torch.equal(caption_ids, labels * 2)


def test_caption_folder_pairs_images_with_their_captions(image_folder, tmp_path):
    from datamodules.captions import CaptionFolderDataModule

    files = sorted(p for p in image_folder.rglob("*") if p.is_file())
    captions = tmp_path / "captions.tsv"
    captions.write_text("".join(f"{f.relative_to(image_folder).as_posix()}\timage number {i}\n" for i, f in enumerate(files)))
    number = {f.relative_to(image_folder).as_posix(): i for i, f in enumerate(files)}
    dm = CaptionFolderDataModule(captions_file=str(captions), source=str(image_folder), batch_size=4, num_workers=0)
    dm.setup("fit")
    images, tokens, labels, caption_ids = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    source = dm.get_source("val")
    for row, index in zip(tokens, caption_ids.tolist()):
        text = f"image number {number[source.files[index].relative_to(image_folder).as_posix()]}"
        assert torch.equal(row, dm.tokenizer(text)[0])
    captions.write_text(captions.read_text().splitlines()[0] + "\n")
    from modules.components.errors import DataError
    with pytest.raises(DataError, match="no caption"):
        CaptionFolderDataModule(captions_file=str(captions), source=str(image_folder), num_workers=0).setup("fit")


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
    assert any(k.startswith("ema_image_encoder.") for k in checkpoint["state_dict"])  # resumes with its scorer


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
    from datamodules.captions import FFCVCaptionFolderDataModule

    dm = FFCVCaptionFolderDataModule(captions_file=str(captions), source=str(image_folder), cache_dir=str(beton_cache),
                                     batch_size=8, num_workers=1, val_fraction=0.25, context_length=16, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_ffcv_caption_folder_yields_each_images_captions_like_the_torchvision_one(image_folder, tmp_path, beton_cache):
    from datamodules.captions import CaptionFolderDataModule

    captions, per_image = _captions_with_repeats(image_folder, tmp_path)
    dm = _ffcv_caption_folder(image_folder, captions, beton_cache)
    assert dm.class_prompt_tokens().shape == (3, 5, 16)
    source = dm.get_source("val")
    batches = [dm.on_after_batch_transfer(batch, 0) for batch in dm.val_dataloader()]
    images = torch.cat([b[0] for b in batches])
    tokens, labels, caption_ids = (torch.cat([b[i] for b in batches]) for i in (1, 2, 3))
    assert images.dtype == torch.float32 and images.shape == (len(source), 3, 32, 32)
    assert tokens.dtype == torch.int64 and tokens.shape == (len(source), 16)
    texts = [per_image[f.relative_to(image_folder).as_posix()][0] for f in source.files]  # validation: first caption
    assert torch.equal(tokens, dm.tokenizer(texts))  # sequential val order = source order = .beton order
    assert torch.equal(labels, torch.as_tensor(source.labels))
    same_text = torch.tensor([[a == b for b in texts] for a in texts])
    assert torch.equal(caption_ids[:, None] == caption_ids[None], same_text)
    assert len(set(texts)) < len(texts)  # the check above saw shared texts

    reference = CaptionFolderDataModule(captions_file=str(captions), source=str(image_folder), batch_size=8,
                                        num_workers=0, val_fraction=0.25, context_length=16)
    reference.setup("fit")
    expected = [reference.on_after_batch_transfer(batch, 0) for batch in reference.val_dataloader()]
    for i, got in ((1, tokens), (2, labels), (3, caption_ids)):
        assert torch.equal(torch.cat([b[i] for b in expected]), got)


def test_ffcv_caption_folder_training_picks_among_an_images_captions(image_folder, tmp_path, beton_cache):
    captions, per_image = _captions_with_repeats(image_folder, tmp_path)
    dm = _ffcv_caption_folder(image_folder, captions, beton_cache)
    dm._training = lambda: True  # as under trainer.fit
    source = dm.get_source("train")
    seen: dict[int, set[str]] = {}
    text_of_id: dict[int, str] = {}
    decode = {tuple(dm.tokenizer([t])[0].tolist()): t for texts in per_image.values() for t in texts}
    for batch in dm.train_dataloader():
        for _ in range(12):
            _, tokens, _, caption_ids = dm.on_after_batch_transfer(batch, 0)
            for index, row, caption_id in zip(batch[2].tolist(), tokens, caption_ids.tolist()):
                text = decode[tuple(row.tolist())]
                assert text in per_image[source.files[index].relative_to(image_folder).as_posix()]
                assert text_of_id.setdefault(caption_id, text) == text  # one id, one text
                seen.setdefault(index, set()).add(text)
    multi = [i for i in seen if len(per_image[source.files[i].relative_to(image_folder).as_posix()]) == 2]
    assert multi and all(len(seen[i]) == 2 for i in multi)  # both captions drawn over 12 steps
    assert all(len(seen[i]) == 1 for i in seen if i not in multi)


def test_caption_folders_reject_missing_captions(image_folder, tmp_path, beton_cache):
    from datamodules.captions import FFCVCaptionFolderDataModule
    from modules.components.errors import ConfigError, DataError

    kwargs = dict(source=str(image_folder), cache_dir=str(beton_cache), num_workers=0)
    with pytest.raises(ConfigError, match="not found"):
        FFCVCaptionFolderDataModule(captions_file=str(tmp_path / "absent.tsv"), **kwargs).caption_table("train")
    captions, _ = _captions_with_repeats(image_folder, tmp_path)
    captions.write_text(captions.read_text().splitlines()[1] + "\n")
    with pytest.raises(DataError, match="have no caption"):
        FFCVCaptionFolderDataModule(captions_file=str(captions), **kwargs).caption_table("train")
    with pytest.raises(ConfigError, match="ImageFolder source"):
        FFCVCaptionFolderDataModule(captions_file=str(captions), source="fashion_mnist", cache_dir=str(beton_cache))


@pytest.mark.slow
def test_ffcv_caption_folder_config_fits_through_cli(run_cli, tmp_path, beton_cache, image_folder):
    captions, _ = _captions_with_repeats(image_folder, tmp_path)
    tiny = ["--model.init_args.backbone", "test_vit", "--model.init_args.backbone_kwargs", '{"patch_size": 4, "depth": 2}',
            "--model.init_args.embed_dim", "32", "--model.init_args.text_width", "32", "--model.init_args.text_depth", "1",
            "--model.init_args.text_heads", "2"]
    data = ["--data.init_args.source", str(image_folder), "--data.init_args.captions_file", str(captions),
            "--data.init_args.image_size", "32", "--data.init_args.batch_size", "8", "--data.init_args.context_length", "16",
            "--data.init_args.write_mode", "raw", "--data.init_args.max_resolution", "null"]
    args = cli_args(tmp_path / "run", beton_cache, *tiny, *data, "--trainer.fast_dev_run", "true",
                    model="clip/imagefolder_captions_ffcv.yaml", data="data/imagefolder.yaml")
    assert run_cli(args) == 0
