"""`Frozen` auxiliary networks and `build_from_checkpoint`: the one way every technique reuses a trained net."""

import pytest
import torch
from torch import nn

from modules.components.backbones import create_backbone
from modules.components.errors import ConfigError
from modules.components.frozen import Frozen
from modules.components.transfer import build_from_checkpoint, checkpoint_architecture

VIT_KWARGS = {"patch_size": 4, "depth": 2}


def _save(path, model, **hparams):
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": hparams}, path)
    return path


@pytest.fixture
def vit_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = create_backbone("test_vit", num_classes=4, image_size=32, **VIT_KWARGS)
    return model, _save(tmp_path / "vit.ckpt", model, backbone="test_vit", backbone_kwargs=VIT_KWARGS,
                        num_classes=4, image_size=32)


def test_frozen_stays_in_eval_mode_untrainable_and_out_of_the_checkpoint():
    owner = nn.ModuleDict({"student": nn.Linear(3, 3), "teacher": Frozen(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)))})
    owner.train()
    assert owner["student"].training and not owner["teacher"].training and not owner["teacher"].module[1].training
    assert not any(p.requires_grad for p in owner["teacher"].parameters())
    state = owner.state_dict()
    assert sorted(state) == ["student.bias", "student.weight"]
    fresh = nn.ModuleDict({"student": nn.Linear(3, 3), "teacher": Frozen(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)))})
    teacher_before = fresh["teacher"].module[0].weight.clone()
    fresh.load_state_dict(state, strict=True)  # the teacher's absent keys are filled from the live teacher
    assert torch.equal(fresh["student"].weight, owner["student"].weight)
    assert torch.equal(fresh["teacher"].module[0].weight, teacher_before)


def test_frozen_in_checkpoint_keeps_the_unwrapped_names_and_round_trips():
    torch.manual_seed(0)
    owner = nn.ModuleDict({"backbone": Frozen(nn.Linear(2, 2), in_checkpoint=True)})
    state = owner.state_dict()
    assert sorted(state) == ["backbone.bias", "backbone.weight"]  # as if the wrapper were not there
    other = nn.ModuleDict({"backbone": Frozen(nn.Linear(2, 2), in_checkpoint=True)})
    other.load_state_dict(state, strict=True)
    assert torch.equal(other["backbone"].module.weight, owner["backbone"].module.weight)


def test_build_keeps_replaces_or_drops_the_head(vit_checkpoint):
    trained, path = vit_checkpoint
    images = torch.randn(2, 3, 32, 32)
    trained.eval()
    kept = build_from_checkpoint(path, head="keep")[0].eval()
    with torch.no_grad():
        assert torch.equal(kept(images), trained(images))  # architecture from the hyper-parameters alone
        replaced = build_from_checkpoint(path, head="replace", num_classes=7)[0].eval()
        assert replaced(images).shape == (2, 7)
        assert torch.equal(replaced.forward_features(images), trained.forward_features(images))
        dropped = build_from_checkpoint(path, head="drop")[0].eval()
        assert torch.equal(dropped(images), trained.forward_head(trained.forward_features(images), pre_logits=True))
    with pytest.raises(ConfigError, match="predicts 4 classes"):
        build_from_checkpoint(path, head="keep", num_classes=7)


def test_build_resamples_position_embeddings_to_a_new_resolution(vit_checkpoint):
    from timm.layers import resample_abs_pos_embed

    trained, path = vit_checkpoint
    bigger, _ = build_from_checkpoint(path, head="replace", image_size=64)
    expected = resample_abs_pos_embed(trained.pos_embed.detach(), new_size=[16, 16], num_prefix_tokens=1)
    torch.testing.assert_close(bigger.pos_embed.detach(), expected, rtol=0, atol=0)


def test_given_kwargs_override_the_recorded_ones_and_pretrained_files_are_not_reread(tmp_path, vit_checkpoint):
    _, path = vit_checkpoint
    arch = checkpoint_architecture(path, kwargs={"drop_path_rate": 0.1})
    assert arch.name == "test_vit" and arch.kwargs == {**VIT_KWARGS, "drop_path_rate": 0.1} and arch.image_size == 32
    torch.manual_seed(0)
    model = create_backbone("test_resnet", num_classes=3)
    recorded = _save(tmp_path / "r.ckpt", model, backbone="test_resnet", num_classes=3,
                     backbone_kwargs={"pretrained_file": str(tmp_path / "gone.safetensors")})
    assert "pretrained_file" not in checkpoint_architecture(recorded).kwargs
    build_from_checkpoint(recorded)  # the weights come from the checkpoint, the long-gone file is not needed


def test_plain_state_dict_needs_a_name_and_a_wrong_architecture_names_the_keys(tmp_path, vit_checkpoint):
    trained, _ = vit_checkpoint
    plain = tmp_path / "plain.pth"
    torch.save(trained.state_dict(), plain)
    with pytest.raises(ConfigError, match="records no backbone architecture"):
        build_from_checkpoint(plain)
    rebuilt, _ = build_from_checkpoint(plain, head="keep", num_classes=4, image_size=32, backbone="test_vit",
                                    backbone_kwargs=VIT_KWARGS)
    assert torch.equal(rebuilt.pos_embed, trained.pos_embed)
    with pytest.raises(ConfigError, match="does not match the model: unexpected .*blocks.1"):
        build_from_checkpoint(plain, num_classes=4, image_size=32, backbone="test_vit",
                              backbone_kwargs={"patch_size": 4, "depth": 1})
    with pytest.raises(ConfigError, match="does not exist"):
        build_from_checkpoint(tmp_path / "missing.ckpt")
