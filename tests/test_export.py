"""``visionlab export``: safetensors that plain timm loads (no visionlab import), ONNX that onnxruntime runs."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import lightning
import numpy as np
import pytest
import timm
import torch

from modules.classification import ClassificationModule
from modules.clip import CLIPModule
from modules.components.peft.methods import AdapterTuning, DoRATuning, LoRATuning
from modules.linear_probe import LinearProbeModule
from modules.peft import PEFTModule
from tests.conftest import one_line_error

DATA = {"mean": [0.25, 0.5, 0.75], "std": [0.2, 0.3, 0.4]}  # what the run's DataModule recorded
VIT = dict(backbone="vit_tiny_patch16_224", backbone_kwargs={"patch_size": 8, "depth": 2}, image_size=32)

# Loads the exported weights with timm alone, the way the module docstring of app/export.py tells a user to.
PLAIN_TIMM = """
import json, sys, timm, torch
meta = json.load(open(sys.argv[1]))
model = timm.create_model(meta["architecture"], pretrained=True, num_classes=meta["num_classes"],
                          pretrained_cfg_overlay=dict(meta["pretrained_cfg_overlay"], file=sys.argv[2]),
                          **meta["model_kwargs"]).eval()
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[3])), sys.argv[4])
assert not [m for m in sys.modules if m.split(".")[0] in ("modules", "app", "datamodules", "callbacks")]
assert list(timm.data.resolve_data_config({}, model=model)["mean"]) == meta["mean"]  # the data config follows
"""


@pytest.fixture(autouse=True)
def _quiet():
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message="PEFT method")


def save_run(module, path, datamodule: bool = True) -> str:
    """A checkpoint as ``visionlab fit`` writes it (the keys export reads)."""
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": lightning.__version__}
    if datamodule:
        ckpt["datamodule_hyper_parameters"] = dict(DATA)
    torch.save(ckpt, path)
    return str(path)


def export(run_cli, checkpoint: str, fmt: str, output) -> dict:
    assert run_cli(["export", "--checkpoint", checkpoint, "--format", fmt, "--output", str(output)]) == 0
    return json.loads(output.with_suffix(".json").read_text())


def images(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))


def onnx_outputs(path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"image": x.numpy()})[0])


def assert_onnx_matches(path, network) -> None:
    for n in (1, 5):  # the batch axis is dynamic (exported with batch 2)
        x = images(n)
        with torch.no_grad():
            expected = network(x)
        # float32 kernels in another order: a few eps relative over the network, far below any wrong op
        torch.testing.assert_close(onnx_outputs(path, x), expected, atol=1e-4 * (1 + float(expected.abs().max())), rtol=0)


@pytest.mark.slow
def test_classifier_safetensors_loads_in_plain_timm_in_a_subprocess(tmp_path, run_cli):
    model = ClassificationModule(backbone="test_resnet", num_classes=7, image_size=32).eval()
    checkpoint = save_run(model, tmp_path / "run.ckpt")
    meta = export(run_cli, checkpoint, "safetensors", tmp_path / "out" / "model.safetensors")
    assert (meta["architecture"], meta["num_classes"], meta["input_size"]) == ("test_resnet", 7, [3, 32, 32])
    assert (meta["mean"], meta["std"], meta["head"]) == (DATA["mean"], DATA["std"], "timm classifier")
    x = images(3)
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", PLAIN_TIMM, str(tmp_path / "out" / "model.json"),
                    str(tmp_path / "out" / "model.safetensors"), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True, cwd=tmp_path)  # cwd outside the repository: visionlab is not importable by accident
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), model(x), atol=1e-6, rtol=1e-6)


def test_kd_student_exports_as_its_timm_model(tmp_path, run_cli):
    student = timm.create_model("test_resnet", num_classes=4).eval()
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in student.state_dict().items()},
                "hyper_parameters": {"student": "test_resnet", "student_kwargs": {}, "num_classes": 4, "image_size": 32},
                "pytorch-lightning_version": lightning.__version__}, tmp_path / "kd.ckpt")
    meta = export(run_cli, str(tmp_path / "kd.ckpt"), "safetensors", tmp_path / "student.safetensors")
    assert meta["technique"] == "kd student" and meta["normalization_from"] == "timm default"
    loaded = timm.create_model("test_resnet", pretrained=True, num_classes=4, **meta["model_kwargs"],
                               pretrained_cfg_overlay=dict(file=str(tmp_path / "student.safetensors"), num_classes=4)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images(2)), student(images(2)))


@pytest.fixture
def vit_checkpoint(tmp_path) -> str:
    pretrained = ClassificationModule(**VIT, num_classes=5)
    return save_run(pretrained, tmp_path / "pretrained.ckpt")


@pytest.mark.slow
def test_peft_dora_merges_into_safetensors_and_onnx(tmp_path, run_cli, vit_checkpoint):
    model = PEFTModule(**VIT, num_classes=3, init_checkpoint=vit_checkpoint, method=DoRATuning(rank=4, targets=["qkv", "fc2"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    checkpoint = save_run(model, tmp_path / "peft.ckpt")
    (tmp_path / "pretrained.ckpt").unlink()  # export rebuilds from the run's own frozen weights
    meta = export(run_cli, checkpoint, "safetensors", tmp_path / "dora.safetensors")
    assert meta["model_kwargs"] == {"patch_size": 8, "depth": 2, "img_size": 32}
    plain = timm.create_model(meta["architecture"], pretrained=True, num_classes=meta["num_classes"], **meta["model_kwargs"],
                              pretrained_cfg_overlay=dict(meta["pretrained_cfg_overlay"], file=str(tmp_path / "dora.safetensors")))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(images(2)), model(images(2)), atol=1e-5, rtol=1e-5)
    meta = export(run_cli, checkpoint, "onnx", tmp_path / "dora.onnx")
    assert meta["files"] == {"safetensors": "dora.safetensors", "onnx": "dora.onnx"}
    assert_onnx_matches(tmp_path / "dora.onnx", model)


@pytest.mark.slow
def test_linear_probe_onnx_carries_the_batchnorm_head_and_safetensors_the_encoder(tmp_path, run_cli, vit_checkpoint):
    probe = LinearProbeModule(num_classes=4, image_size=32, init_checkpoint=vit_checkpoint, pool="avg")
    with torch.no_grad():
        probe.head[0].running_mean.normal_()
        probe.head[0].running_var.uniform_(0.5, 2.0)
        probe.head[1].weight.normal_()
    probe.eval()
    checkpoint = save_run(probe, tmp_path / "probe.ckpt")
    meta = export(run_cli, checkpoint, "onnx", tmp_path / "probe.onnx")
    assert meta["technique"] == "linear probe" and "BatchNorm1d" in meta["head"]
    assert meta["onnx"] == {"input": meta["onnx"]["input"], "output": "logits", "output_size": 4, "dynamic_axes": ["batch"]}
    assert_onnx_matches(tmp_path / "probe.onnx", probe)
    meta = export(run_cli, checkpoint, "safetensors", tmp_path / "probe.safetensors")
    assert meta["num_classes"] == 0  # the frozen encoder only
    encoder = timm.create_model(meta["architecture"], pretrained=True, num_classes=0, **meta["model_kwargs"],
                                pretrained_cfg_overlay=dict(meta["pretrained_cfg_overlay"], file=str(tmp_path / "probe.safetensors")))
    with torch.no_grad():
        tokens = encoder.eval().forward_features(images(2))
        torch.testing.assert_close(tokens, probe.backbone.module.forward_features(images(2)))


@pytest.mark.slow
def test_clip_image_tower_onnx_gives_the_normalised_embedding(tmp_path, run_cli):
    clip = CLIPModule(backbone="test_vit", backbone_kwargs={"patch_size": 4, "depth": 2}, image_size=32, embed_dim=16,
                      text_width=32, text_depth=1, text_heads=2).eval()
    checkpoint = save_run(clip, tmp_path / "clip.ckpt")
    meta = export(run_cli, checkpoint, "onnx", tmp_path / "clip.onnx")
    assert meta["onnx"]["output"] == "embedding" and meta["onnx"]["output_size"] == 16 and "projection" in meta["head"]
    assert_onnx_matches(tmp_path / "clip.onnx", clip.model.encode_image)
    x = images(3)
    norms = np.linalg.norm(onnx_outputs(tmp_path / "clip.onnx", x).numpy(), axis=-1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


def test_user_errors_are_one_line(tmp_path, run_cli, capsys, vit_checkpoint):
    assert run_cli(["export", "--checkpoint", str(tmp_path / "missing.ckpt"), "--format", "onnx",
                    "--output", str(tmp_path / "m.onnx")]) == 2
    one_line_error(capsys, "missing.ckpt", "does not exist")
    assert run_cli(["export", "--checkpoint", vit_checkpoint, "--format", "onnx", "--output", str(tmp_path / "m.pt")]) == 2
    one_line_error(capsys, "must end in .onnx")
    adapters = PEFTModule(**VIT, num_classes=3, init_checkpoint=vit_checkpoint, method=AdapterTuning(dim=4))
    checkpoint = save_run(adapters, tmp_path / "adapter.ckpt")
    assert run_cli(["export", "--checkpoint", checkpoint, "--format", "safetensors",
                    "--output", str(tmp_path / "a.safetensors")]) == 2
    one_line_error(capsys, "AdapterTuning", "--format onnx")


def test_lora_merge_exports_without_onnx(tmp_path, run_cli, vit_checkpoint):
    model = PEFTModule(**VIT, num_classes=3, init_checkpoint=vit_checkpoint, method=LoRATuning(rank=2, targets=["fc1"])).eval()
    meta = export(run_cli, save_run(model, tmp_path / "lora.ckpt", datamodule=False), "safetensors", tmp_path / "l.safetensors")
    assert meta["technique"] == "peft (LoRATuning)" and meta["num_classes"] == 3
