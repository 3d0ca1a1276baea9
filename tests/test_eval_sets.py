"""Several evaluation sets in one run (data.extra_eval), and the raw + averaged weights of EMA/SWA runs."""

from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from PIL import Image
from torch.utils.data import DataLoader

from callbacks.averaging import EMA, SWA
from callbacks.evaluation import EvalResults
from datamodules import sources
from modules.components.errors import ConfigError
from tests.conftest import cli_args, ffcv_data, torchvision_data
from tests.test_callbacks import fashion_tensors, tiny_module, trainer

BIAS = torch.arange(9, -1, -1, dtype=torch.float32)  # logits of the constant model: class 0 first, 5..9 outside top-5


def constant_model():
    """A 10-class classifier whose logits are ``BIAS`` for every image (zero classifier weights)."""
    from modules.classification import ClassificationModule

    model = ClassificationModule("test_resnet", num_classes=10, image_size=32)
    head = model.backbone.get_classifier()
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(BIAS)
    return model


def one_class_folder(root, folder: str, count: int = 8, offset: int = 0):
    """``root/<folder>/`` holding ``count`` real Fashion-MNIST photos as PNG (the folder names the class)."""
    data = sources.fashion_mnist("val")
    (root / folder).mkdir(parents=True)
    for i in range(count):
        Image.fromarray(data.images[offset + i]).convert("RGB").save(root / folder / f"{i:03d}.png")
    return root


@pytest.fixture
def eval_folders(tmp_path):
    # "right": every image in class 0, which the constant model always predicts; "wrong": class 7, outside its top-5
    return {"right": str(one_class_folder(tmp_path / "right", "0")),
            "wrong": str(one_class_folder(tmp_path / "wrong", "7", offset=8))}


def datamodule(backend: str, extra_eval: dict, cache):
    common = dict(source="fashion_mnist", image_size=32, val_crop_ratio=1.0, train_limit=64, val_limit=16,
                  batch_size=8, extra_eval=extra_eval)
    if backend == "ffcv":

        return ffcv_data(cache_dir=str(cache), num_workers=1, **common)
    if backend == "streaming":  # the extra sets become shard sets of their own in the cache
        from datamodules.base import ImageDataModule
        from datamodules.streaming_loader import StreamingLoader

        return ImageDataModule(loader=StreamingLoader(cache_dir=str(cache), write_workers=1), num_workers=2, **common)
    return torchvision_data(num_workers=0, **common)


@pytest.mark.parametrize("backend", ["torchvision", "ffcv", "streaming"])
def test_extra_sets_log_their_own_metrics_and_fill_the_results_json(backend, eval_folders, beton_cache, tmp_path):
    data = datamodule(backend, eval_folders, tmp_path / "shards" if backend == "streaming" else beton_cache)
    assert data.eval_sets() == ["val", "right", "wrong"]
    results = tmp_path / "results.json"
    fit = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                     callbacks=[EvalResults(str(results))])
    fit.validate(constant_model(), datamodule=data)
    metrics = {k: float(v) for k, v in fit.callback_metrics.items()}
    log_z = float(torch.logsumexp(BIAS, 0))
    labels = data.get_source("val").labels
    assert metrics["val/acc1"] == pytest.approx(float((labels == 0).mean()))  # the main set: its own labels
    assert metrics["val_right/acc1"] == 1.0 and metrics["val_right/acc5"] == 1.0
    assert metrics["val_wrong/acc1"] == 0.0 and metrics["val_wrong/acc5"] == 0.0
    assert metrics["val_right/loss"] == pytest.approx(log_z - 9, rel=1e-5)  # -log softmax(BIAS)[0]
    assert metrics["val_wrong/loss"] == pytest.approx(log_z - 2, rel=1e-5)  # -log softmax(BIAS)[7]
    assert not any("dataloader_idx" in key for key in metrics)
    written = json.loads(results.read_text())
    assert written["sets"]["val_right"]["acc1"] == 1.0 and written["sets"]["val_wrong"]["acc1"] == 0.0
    assert written["sets"]["val_wrong"]["acc5"] == 0.0 and "acc5" in written["sets"]["val"]
    assert written["val"]["val_right/acc1"] == 1.0


def test_extra_sets_through_the_cli_during_fit_and_validate(run_cli, eval_folders, beton_cache, tmp_path):
    extra = ["--data.init_args.extra_eval", json.dumps(eval_folders), "--data.init_args.val_limit", "16"]
    assert run_cli(cli_args(tmp_path / "fit", beton_cache, *extra)) == 0
    written = tmp_path / "results.json"
    assert run_cli(cli_args(tmp_path / "val", beton_cache, *extra, "--trainer.callbacks+=callbacks.evaluation.EvalResults",
                            f"--trainer.callbacks.path={written}", command="validate")) == 0
    sets = json.loads(written.read_text())["sets"]
    assert {"val", "val_right", "val_wrong"} <= set(sets) and {"acc1", "acc5", "loss"} <= set(sets["val_right"])


def test_extra_set_folders_must_name_training_classes(tmp_path):
    one_class_folder(tmp_path / "odd", "sneakers", count=1)
    with pytest.raises(ConfigError, match="sneakers"):
        sources.labelled_folder(tmp_path / "odd", sources.FASHION_MNIST_CLASSES)
    with pytest.raises(ConfigError, match="val_<name>"):
        datamodule("torchvision", {"raw": str(tmp_path)}, None)


# --- raw and averaged weights ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def val_loader():
    return DataLoader(fashion_tensors(64, offset=200), batch_size=32)


@pytest.fixture(scope="module")
def train_loader():
    return DataLoader(fashion_tensors(96), batch_size=32)


def evaluate(state: dict, loader, backbone: str = "test_resnet") -> tuple[float, float]:
    """(top-1, mean per-batch cross-entropy) of ``state`` loaded into a fresh module, by hand."""
    module = tiny_module(backbone)
    module.load_state_dict(state)
    module.eval()
    hits, losses = 0, []
    with torch.no_grad():
        for batch in loader:
            images, labels = batch["image"], batch["label"]
            logits = module(images)
            hits += int((logits.argmax(1) == labels).sum())
            losses.append(float(F.cross_entropy(logits, labels)))
    return hits / len(loader.dataset), sum(losses) / len(losses)


class States(Callback):
    """The module's full state and the averaging callback's other weights at the last validation epoch start."""

    def __init__(self, other):
        self.other, self.module, self.other_state = other, None, None

    def on_validation_epoch_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.module = {k: v.clone() for k, v in pl_module.state_dict().items()}
            self.other_state = self.other(pl_module)


def test_ema_logs_averaged_and_raw_weights_as_evaluated_by_hand(tmp_path, train_loader, val_loader):
    torch.manual_seed(0)
    ema = EMA(decay=0.5)
    states = States(lambda pl_module: {k: v.clone() for k, v in ema.average_model.state_dict().items()})
    fit = trainer(tmp_path, [ema, states], num_sanity_val_steps=0)  # EMA first: its swap precedes the recorder
    fit.fit(tiny_module("test_resnet"), train_loader, val_loader)
    averaged, raw = states.module, states.other_state  # Lightning swapped the average in; raw waits in its copy
    assert any(not torch.equal(averaged[k], raw[k]) for k in raw if "running_mean" in k)  # BatchNorm buffers too
    metrics = {k: float(v) for k, v in fit.callback_metrics.items()}
    for prefix, state in (("val", averaged), ("val_raw", raw)):
        acc1, loss = evaluate(state, val_loader)
        assert metrics[f"{prefix}/acc1"] == pytest.approx(acc1, abs=1e-7)
        assert metrics[f"{prefix}/loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["val/loss"] != pytest.approx(metrics["val_raw/loss"], rel=1e-3)


def test_raw_evaluation_leaves_training_checkpoints_and_resume_unchanged(tmp_path, train_loader, val_loader):
    outcomes = []
    for evaluate_raw in (False, True):
        torch.manual_seed(0)
        folder = tmp_path / str(evaluate_raw)
        module = tiny_module("test_resnet")
        checkpoint = ModelCheckpoint(dirpath=folder, save_last=True, monitor="val/acc1", mode="max")
        fit = trainer(folder, [EMA(decay=0.5, evaluate_raw=evaluate_raw), checkpoint], max_epochs=2)
        fit.fit(module, train_loader, val_loader)
        saved = torch.load(folder / "last.ckpt", weights_only=False)
        outcomes.append((module.state_dict(), saved["state_dict"], saved["current_model_state"],
                         checkpoint.best_model_score, "val_raw/acc1" in fit.callback_metrics))
    (final0, avg0, raw0, best0, logged0), (final1, avg1, raw1, best1, logged1) = outcomes
    assert not logged0 and logged1
    for first, second in ((final0, final1), (avg0, avg1), (raw0, raw1)):
        for key in first:
            assert torch.equal(first[key], second[key]), key
    assert float(best0) == float(best1)  # checkpoint selection still reads val/acc1, the average
    resumed = trainer(tmp_path / "resumed", [EMA(decay=0.5)], max_epochs=3)
    resumed.fit(tiny_module("test_resnet"), train_loader, val_loader, ckpt_path=tmp_path / "True" / "last.ckpt",
                weights_only=False)
    assert "val_raw/acc1" in resumed.callback_metrics


def test_validate_of_an_ema_checkpoint_evaluates_its_raw_weights(tmp_path, train_loader, val_loader):
    torch.manual_seed(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, monitor=None)
    trainer(tmp_path, [EMA(decay=0.5), checkpoint], num_sanity_val_steps=0).fit(
        tiny_module("test_resnet"), train_loader, val_loader)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    check = trainer(tmp_path / "v", [EMA(decay=0.5)])
    check.validate(tiny_module("test_resnet"), val_loader, ckpt_path=tmp_path / "last.ckpt", weights_only=False)
    metrics = {k: float(v) for k, v in check.callback_metrics.items()}
    for prefix, state in (("val", saved["state_dict"]), ("val_raw", saved["current_model_state"])):
        acc1, loss = evaluate(state, val_loader)
        assert metrics[f"{prefix}/acc1"] == pytest.approx(acc1, abs=1e-7)
        assert metrics[f"{prefix}/loss"] == pytest.approx(loss, rel=1e-5)


def test_swa_logs_the_running_average_beside_the_trained_weights(tmp_path, train_loader, val_loader):
    torch.manual_seed(0)
    swa = SWA(swa_lrs=0.02, swa_epoch_start=2, annealing_epochs=1)
    states = States(lambda pl_module: {k: v.clone() for k, v in swa._average_model.state_dict().items()})
    fit = trainer(tmp_path, [swa, states], max_epochs=3, num_sanity_val_steps=0)
    fit.fit(tiny_module("test_vit"), train_loader, val_loader)
    trained, average = states.module, states.other_state  # the last SWA epoch (2): averaged epochs 1 and 2
    assert any(not torch.equal(trained[k], average[k]) for k in trained)
    metrics = {k: float(v) for k, v in fit.callback_metrics.items()}
    for prefix, state in (("val", trained), ("val_avg", average)):
        acc1, loss = evaluate(state, val_loader, "test_vit")
        assert metrics[f"{prefix}/acc1"] == pytest.approx(acc1, abs=1e-7)
        assert metrics[f"{prefix}/loss"] == pytest.approx(loss, rel=1e-5)
    assert not math.isclose(metrics["val/loss"], metrics["val_avg/loss"], rel_tol=1e-4)


def test_extra_sets_with_a_technique_logging_fixed_keys_is_a_config_error(eval_folders):
    from modules.classification import ClassificationModule

    class FixedKeys(ClassificationModule):
        def validation_step(self, batch, batch_idx):  # logs val/... whatever the set: the sets would mix
            return super().validation_step(batch, batch_idx)

    fit = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    with pytest.raises(ConfigError, match="extra_eval"):
        fit.validate(FixedKeys("test_resnet", num_classes=10, image_size=32),
                     datamodule=datamodule("torchvision", eval_folders, None))


def _supervised(kind: str, tmp_path):
    """A tiny module of each technique on the shared supervised path (tests/test_eval_sets.py's 10 classes, 32 px)."""
    from modules.components.optim import OptimConfig
    from modules.kd import DistillationModule
    from modules.linear_probe import LinearProbeModule
    from modules.peft import PEFTModule

    optim = OptimConfig(name="sgd", lr=0.05, warmup_epochs=0, weight_decay=0.0)
    if kind == "classification":
        return tiny_module("test_resnet")
    if kind == "kd":
        from modules.components.kd.targets import OnlineTeachers

        return DistillationModule("test_resnet", num_classes=10, image_size=32, optim=optim,
                                  targets=OnlineTeachers(teachers=["test_resnet"]))  # a random teacher: smoke only
    if kind == "peft":
        return PEFTModule("test_resnet", num_classes=10, image_size=32, optim=optim)  # SSF
    checkpoint = tmp_path / "encoder.ckpt"  # the probe's frozen encoder: a classifier's state dict
    torch.save({"state_dict": tiny_module("test_resnet").state_dict(),
                "hyper_parameters": {"backbone": "test_resnet", "backbone_kwargs": {}}}, checkpoint)
    return LinearProbeModule("test_resnet", num_classes=10, image_size=32, init_checkpoint=str(checkpoint), optim=optim)


@pytest.mark.parametrize("kind", ["classification", "kd", "linear_probe", "peft"])
def test_every_supervised_technique_logs_top_k_and_the_ema_raw_weights(kind, tmp_path, train_loader, val_loader):
    torch.manual_seed(0)
    module = _supervised(kind, tmp_path)
    with pytest.warns() as caught:
        fit = trainer(tmp_path, [EMA(decay=0.5)], num_sanity_val_steps=0)
        fit.fit(module, train_loader, val_loader)
    assert not [w for w in caught if "logs fixed val/ keys" in str(w.message)]  # the raw weights were evaluated
    metrics = fit.callback_metrics
    for key in ("val/acc1", "val/acc5", "val/loss", "val_raw/acc1", "val_raw/acc5", "val_raw/loss"):
        assert key in metrics, (kind, sorted(metrics))
    assert 0 <= float(metrics["val/acc1"]) <= float(metrics["val/acc5"]) <= 1
    if kind != "kd":  # KD trains on soft targets: no training accuracy
        assert "train/acc5" in metrics


@pytest.mark.parametrize("kind", ["classification", "linear_probe", "peft"])
def test_mixup_mixes_images_and_targets_the_same_way_in_every_supervised_technique(kind, tmp_path):
    """timm's Mixup (alpha 1, no CutMix) through the shared step: the network sees ``lam x + (1 - lam) x.flip(0)``
    and the loss is the soft-target cross-entropy against ``lam y_s + (1 - lam) y_s.flip(0)``, with ``y_s`` the
    smoothed one-hot labels (smoothing / C off the class, 1 - smoothing + smoothing / C on it)."""
    torch.manual_seed(0)
    module = _supervised(kind, tmp_path)
    module.label_smoothing = smoothing = 0.1
    module.use_mixup(1.0, 0.0, smoothing)
    seen, logged = [], []
    forward = module.forward
    module.forward = lambda images: seen.append(images.clone()) or forward(images)
    module.log_training = lambda loss, logits=None, labels=None: logged.append(labels)
    module.train()
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 5])
    loss = module.training_step({"image": images.clone(), "label": labels}, 0)  # timm mixes in place
    mixed, flipped = seen[0], images.flip(0)
    x, f = images.double(), flipped.double()  # lam by least squares in float64: its error stays far below atol
    lam = float(((mixed.double() - f) * (x - f)).sum() / (x - f).pow(2).sum())
    assert 0.0 < lam < 1.0
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * flipped, atol=1e-5, rtol=0)
    one_hot = torch.full((6, 10), smoothing / 10).scatter_(1, labels[:, None], 1 - smoothing + smoothing / 10)
    target = lam * one_hot + (1 - lam) * one_hot.flip(0)
    module.forward = forward
    with torch.no_grad():
        expected = -(target * F.log_softmax(module(mixed), dim=-1)).sum(-1).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)
    assert logged == [None]  # no training accuracy against mixed targets
    with pytest.raises(ConfigError, match="even training batch"):
        module.training_step({"image": images[:5], "label": labels[:5]}, 0)
