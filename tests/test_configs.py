"""Every YAML under configs/ is instantiated through the CLI, in the layers it is meant for.

The trainer, the DataModule and the model (with every injected part: methods, target sources, denoisers,
callbacks) are built by ``VisionlabCLI(run=False)``, so each ``class_path`` resolves, each ``init_args`` key
type-checks and each constructor runs. Checkpoints a config names that only exist after other runs
(``runs/...``) are replaced by tiny stand-ins: one test_vit classifier (its architecture is read from the
checkpoint by every consumer) and, for the DiT transfer configs, a denoiser of the config's own shape.
Each technique's ``debug.yaml`` is also trained for real by that technique's tests.
"""

from __future__ import annotations

import re
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from app.cli import VisionlabCLI
from datamodules.sources import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from modules.components.backbones import create_backbone
from tests.conftest import CONFIGS

TRAINER, DATA, MODEL = CONFIGS / "trainer/cpu.yaml", CONFIGS / "data/fashion_mnist.yaml", CONFIGS / "classification/debug.yaml"
RUNS_CHECKPOINT = re.compile(r"runs/[\w./-]+\.ckpt")
SYNSETS = ["n01440764", "n01443537"]


def _layers(config) -> list:
    """The config files a run composes, in order: trainer, data, technique (PEFT: base + overlay), then ``config``."""
    folder = config.parent.name
    data = CONFIGS / "data/imagefolder.yaml" if "imagefolder" in config.name else DATA
    if folder == "trainer":
        return [config, DATA, MODEL]
    if folder in {"data", "callbacks"}:
        return [TRAINER, *([config] if folder == "data" else [DATA]), MODEL, *([config] if folder == "callbacks" else [])]
    if folder == "peft" and config.name not in {"base.yaml", "debug.yaml"}:
        return [TRAINER, data, CONFIGS / "peft/base.yaml", config]
    return [TRAINER, data, config]


@pytest.fixture(scope="session")
def stand_in_imagenet(tmp_path_factory):
    """/path/to/imagenet as configs/data/imagenet.yaml expects it: train/<synset>/, a flat val/ and the devkit files."""
    root = tmp_path_factory.mktemp("imagenet")
    image = Image.fromarray(np.full((40, 40, 3), 128, dtype=np.uint8))
    for synset in SYNSETS:
        (root / "train" / synset).mkdir(parents=True)
        (root / "val" / synset).mkdir(parents=True)
        image.save(root / "train" / synset / f"{synset}_0.JPEG")
        image.save(root / "val" / synset / f"{synset}_1.JPEG")
    (root / "class_index.txt").write_text("".join(f"{s} {i}\n" for i, s in enumerate(SYNSETS)))
    (root / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n2\n")
    (root / "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish\n")
    (root / "captions.tsv").write_text(f"train/{SYNSETS[0]}/{SYNSETS[0]}_0.JPEG\ta grey square\n")
    return root


@pytest.fixture(scope="session")
def stand_in_classifier(tmp_path_factory):
    """A test_vit classifier checkpoint of Fashion-MNIST's 10 classes, as `visionlab fit` would write it."""
    torch.manual_seed(0)
    kwargs = {"patch_size": 4, "depth": 2}
    model = create_backbone("test_vit", num_classes=10, image_size=32, **kwargs)
    path = tmp_path_factory.mktemp("stand_in") / "classifier.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"backbone": "test_vit", "backbone_kwargs": kwargs, "num_classes": 10, "image_size": 32},
                "datamodule_hyper_parameters": {"mean": FASHION_MNIST_MEAN, "std": FASHION_MNIST_STD}}, path)
    return path


def _instantiate(args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. DiffFit on a random denoiser while building its stand-in
        return VisionlabCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True,
                            subclass_mode_data=True, run=False, args=args)


def _args(files, root) -> list[str]:
    args = []
    for file in files:
        args += ["--config", str(file)]
    return [*args, "--trainer.default_root_dir", str(root / "run")]


def _stand_in_layers(config, classifier, imagenet, root) -> list:
    """Copies of the layers whose ``runs/...ckpt`` and ``/path/to`` paths point at stand-ins."""
    layers = []
    for index, layer in enumerate(_layers(config)):
        text = layer.read_text().replace("/path/to/imagenet", str(imagenet)).replace("/path/to/", f"{imagenet}/")
        if layer.parent.name == "diffusion" and "init_checkpoint: runs/" in text:  # a DiT of the config's own shape
            plain = root / f"plain-{layer.name}"
            plain.write_text(RUNS_CHECKPOINT.sub(str(classifier), re.sub(r"init_checkpoint: runs/\S+", "init_checkpoint: null", text)))
            denoiser = root / f"denoiser-{layer.name}.ckpt"
            torch.save({"state_dict": _instantiate(_args([*layers, plain], root)).model.state_dict()}, denoiser)
            text = re.sub(r"init_checkpoint: runs/\S+", f"init_checkpoint: {denoiser}", text)
        copy = root / f"{index}-{layer.parent.name}-{layer.name}"
        copy.write_text(RUNS_CHECKPOINT.sub(str(classifier), text))
        layers.append(copy)
    return layers


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_config_instantiates(config, stand_in_classifier, stand_in_imagenet, tmp_path, monkeypatch):
    # the logger layers as their comments say to use them offline: W&B offline, MLflow's file store under tmp_path
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.chdir(tmp_path)  # MLFlowLogger reads MLFLOW_TRACKING_URI when Lightning is imported: its save_dir is used
    args = _args(_stand_in_layers(config, stand_in_classifier, stand_in_imagenet, tmp_path), tmp_path)
    if config.name in {"gpu.yaml", "ddp.yaml"}:  # GPU trainer layers, checked on this CPU-only machine's CPU
        args += ["--trainer.accelerator", "cpu"]
    cli = _instantiate(args)
    own = yaml.safe_load(config.read_text()) or {}
    for section, built in (("model", cli.model), ("data", cli.datamodule)):  # the config's own class is what runs
        class_path = (own.get(section) or {}).get("class_path") if isinstance(own.get(section), dict) else None
        if class_path:
            assert f"{type(built).__module__}.{type(built).__qualname__}" == class_path
    assert isinstance(cli.trainer, pl.Trainer)
    for callback in (own.get("trainer") or {}).get("callbacks+", []) or []:
        assert any(f"{type(c).__module__}.{type(c).__qualname__}" == callback["class_path"] for c in cli.trainer.callbacks)


def test_fashion_mnist_yamls_normalise_with_the_package_constants():
    """The Fashion-MNIST data layers (YAML cannot import) carry the mean / std that benchmarks and tests take from
    ``datamodules.sources``: a retuned number in one place only would make configs and benchmarks disagree."""
    layers = [p for p in sorted(CONFIGS.glob("data/*.yaml"))
              if yaml.safe_load(p.read_text())["data"]["init_args"].get("source") == "fashion_mnist"]
    assert {p.name for p in layers} >= {"fashion_mnist.yaml", "fashion_mnist_torchvision.yaml"}
    for layer in layers:
        init_args = yaml.safe_load(layer.read_text())["data"]["init_args"]
        assert tuple(init_args["mean"]) == FASHION_MNIST_MEAN, layer.name
        assert tuple(init_args["std"]) == FASHION_MNIST_STD, layer.name
