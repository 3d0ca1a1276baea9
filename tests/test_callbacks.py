"""EMA / SWA callbacks and model soups on tiny timm models with real Fashion-MNIST images."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from callbacks.averaging import EMA, SWA, ema_decay
from callbacks.soups import make_soup
from datamodules import sources
from modules.classification import ClassificationModule
from modules.components.errors import ConfigError
from modules.components.optim import OptimConfig
from modules.components.soup import check_compatible, greedy_soup, recompute_batchnorm, uniform_soup
from tests.conftest import CONFIGS, NamedTensors


def fashion_tensors(n: int = 128, offset: int = 0) -> NamedTensors:
    data = sources.fashion_mnist("val")
    images = torch.from_numpy(data.images[offset:offset + n]).float().div(255)
    images = F.pad(images, (2, 2, 2, 2)).unsqueeze(1).expand(-1, 3, -1, -1)
    images = images.sub(sources.FASHION_MNIST_MEAN[0]).div(sources.FASHION_MNIST_STD[0]).contiguous()
    return NamedTensors(images, torch.from_numpy(data.labels[offset:offset + n]).long())


def tiny_module(backbone: str = "test_vit", lr: float = 0.05) -> ClassificationModule:
    kwargs = {"img_size": 32} if "vit" in backbone else {}
    return ClassificationModule(backbone, num_classes=10, image_size=32, backbone_kwargs=kwargs, label_smoothing=0.0,
                                optim=OptimConfig(name="sgd", lr=lr, warmup_epochs=0, weight_decay=0.0))


def trainer(tmp_path, callbacks, max_epochs=1, **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks,
                      enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), **kwargs)


def params(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


class Recorder(Callback):
    """Copies the parameters after every step, at each epoch start, at validation and at train end."""

    def __init__(self):
        self.steps, self.epoch_starts, self.validation, self.train_end = [], [], [], None

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.steps.append(params(pl_module))

    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch_starts.append(params(pl_module))

    def on_validation_epoch_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validation.append(params(pl_module))

    def on_train_end(self, trainer, pl_module):
        self.train_end = params(pl_module)


@pytest.fixture(scope="module")
def loader():
    return DataLoader(fashion_tensors(96), batch_size=32)


def assert_close_dicts(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol, msg=k)


# --- EMA -------------------------------------------------------------------------------------------
def test_ema_decay_zero_equals_model(tmp_path, loader):
    torch.manual_seed(0)
    before, after = Recorder(), Recorder()
    module = tiny_module()
    trainer(tmp_path, [before, EMA(decay=0.0), after], num_sanity_val_steps=0).fit(module, loader, loader)
    assert_close_dicts(params(module), before.train_end)  # EMA copied into the model at train end: unchanged
    assert_close_dicts(after.validation[0], before.steps[-1])


def test_ema_average_used_for_validation(tmp_path, loader):
    torch.manual_seed(0)
    decay = 0.5
    recorder = Recorder()
    module = tiny_module()
    trainer(tmp_path, [EMA(decay=decay), recorder], num_sanity_val_steps=0).fit(module, loader, loader)
    expected = recorder.steps[0]  # the first update copies the weights
    for step in recorder.steps[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * step[k] for k in step}
    assert_close_dicts(recorder.validation[0], expected)
    assert any(not torch.equal(expected[k], recorder.steps[-1][k]) for k in expected)
    assert_close_dicts(params(module), expected)


def test_ema_checkpoint_holds_average_and_resume_keeps_it(tmp_path, loader):
    torch.manual_seed(0)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, monitor=None)
    ema, module = EMA(decay=0.5), tiny_module()
    trainer(tmp_path, [ema, ckpt_cb], num_sanity_val_steps=0).fit(module, loader, loader)
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert "current_model_state" in ckpt
    raw, avg = ckpt["current_model_state"], ckpt["state_dict"]
    assert any(not torch.equal(raw[k], avg[k]) for k in raw if k.startswith("backbone."))

    class CheckResume(Callback):
        def on_train_start(self, trainer, pl_module):
            self.model = {k: v.clone() for k, v in pl_module.state_dict().items()}
            self.average = {k: v.clone() for k, v in resumed_ema.average_model.state_dict().items()}

    resumed_ema, check = EMA(decay=0.5), CheckResume()
    trainer(tmp_path / "r", [resumed_ema, check], max_epochs=2, num_sanity_val_steps=0).fit(
        tiny_module(), loader, loader, ckpt_path=tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    for k in raw:
        torch.testing.assert_close(check.model[k], raw[k], msg=k)
        torch.testing.assert_close(check.average[k], avg[k], msg=k)


def test_ema_warmup_decay_is_timm_model_ema_v3():
    from timm.utils import ModelEmaV3

    timm_ema = ModelEmaV3(torch.nn.Linear(1, 1), decay=0.9999, use_warmup=True)
    for updates in (1, 2, 4, 10, 100, 10_000, 10_000_000):  # ModelEmaV3 is called with the 1-based step count
        assert ema_decay(0.9999, updates, warmup=True) == pytest.approx(timm_ema.get_decay(updates + 1), abs=1e-12)
    assert ema_decay(0.999, 4, warmup=True) == pytest.approx(1 - 5 ** (-2 / 3))  # 0.658, not (1 + 4) / (10 + 4)
    assert ema_decay(0.999, 4, warmup=False) == 0.999


def test_ema_warmup_average_follows_timm_decays(tmp_path, loader):
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    recorder, module = Recorder(), tiny_module()
    trainer(tmp_path, [EMA(decay=0.9, warmup=True), recorder], num_sanity_val_steps=0).fit(module, loader, loader)
    timm_ema = ModelEmaV3(torch.nn.Linear(1, 1), decay=0.9, use_warmup=True)
    expected = recorder.steps[0]  # the first update copies the weights
    for step, weights in enumerate(recorder.steps[1:], start=2):
        d = timm_ema.get_decay(step)
        expected = {k: d * expected[k] + (1 - d) * weights[k] for k in weights}
    assert_close_dicts(recorder.validation[0], expected)


# --- SWA -------------------------------------------------------------------------------------------
def test_swa_average_is_mean_of_collected_weights(tmp_path, loader):
    torch.manual_seed(0)
    recorder, module = Recorder(), tiny_module()
    swa = SWA(swa_lrs=0.02, swa_epoch_start=2, annealing_epochs=1)  # 1-based: averaging from epoch index 1
    fit = trainer(tmp_path, [swa, recorder], max_epochs=4, num_sanity_val_steps=0)
    fit.fit(module, loader, loader)
    assert (swa.swa_start, swa.swa_end) == (1, 3)
    collected = recorder.epoch_starts[1:4]  # SWA averages the weights at the start of epochs 1..3
    mean = {k: torch.stack([c[k] for c in collected]).mean(0) for k in collected[0]}
    assert_close_dicts(params(module), mean, rtol=1e-5, atol=1e-6)
    assert not torch.equal(collected[0]["backbone.head.weight"], collected[-1]["backbone.head.weight"])
    scheduler = fit.lr_scheduler_configs[0].scheduler
    assert scheduler.get_last_lr()[0] == pytest.approx(0.02)  # SWALR stepped through step_update
    assert set(scheduler.state_dict()) >= {"base_lrs", "last_epoch"}  # checkpoints save SWALR's own state


# --- soups -----------------------------------------------------------------------------------------
def accuracy(module, dataset) -> float:
    module.eval()
    with torch.no_grad():
        return float((module(dataset.tensors[0]).argmax(-1) == dataset.tensors[1]).float().mean())


def fine_tunes(base, lrs, data):
    states = []
    for i, lr in enumerate(lrs):
        torch.manual_seed(i)
        module = tiny_module("test_resnet")
        module.load_state_dict(base)
        opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9)
        module.train()
        for batch in DataLoader(data, batch_size=32, shuffle=True):
            opt.zero_grad()
            F.cross_entropy(module(batch["image"]), batch["label"]).backward()
            opt.step()
        states.append({k: v.detach().clone() for k, v in module.state_dict().items()})
    return states


def test_uniform_soup_of_identical_checkpoints_equals_checkpoint():
    torch.manual_seed(0)
    state = tiny_module("test_resnet").state_dict()
    soup = uniform_soup([state, state, state])
    for k, v in state.items():
        torch.testing.assert_close(soup[k], v, rtol=1e-6, atol=1e-7, msg=k)
        assert soup[k].dtype == v.dtype


def test_greedy_soup_never_below_best_ingredient():
    torch.manual_seed(0)
    train, held_out = fashion_tensors(128, 0), fashion_tensors(128, 1000)
    base = tiny_module("test_resnet").state_dict()
    states = fine_tunes(base, [0.01, 0.05, 0.5], train)
    probe = tiny_module("test_resnet")

    def evaluate(state):
        probe.load_state_dict(state)
        recompute_batchnorm(probe, [train.tensors[0][:64]])
        return accuracy(probe, held_out)

    scores = [evaluate(s) for s in states]
    soup, kept, score = greedy_soup(states, evaluate)
    assert score >= max(scores)
    assert kept[0] == max(range(3), key=lambda i: (scores[i], i))  # among equal scores the later one (reference)
    assert evaluate(soup) == pytest.approx(score)


def test_greedy_soup_adds_an_ingredient_only_when_the_score_rises():
    states = [{"w": torch.tensor([float(i)])} for i in range(4)]
    soup, kept, score = greedy_soup(states, lambda s: 0.5, [0.5, 0.5, 0.5, 0.5])  # ties everywhere
    assert kept == [3] and score == 0.5 and torch.equal(soup["w"], states[3]["w"])  # the paper's `>`, last of the ties
    rises = {0.0: 0.7, 1.0: 0.5, 0.5: 0.8}  # w = 0 alone, w = 1 alone, their mean
    soup, kept, score = greedy_soup(states[:2], lambda s: rises[float(s["w"])], [0.7, 0.5])
    assert kept == [0, 1] and score == 0.8 and float(soup["w"]) == 0.5


def test_greedy_soup_tries_tied_ingredients_in_the_reference_order():
    # model-soups main.py: sort by held-out score ascending (stable), then reverse. Scores [0.5, 0.7, 0.5, 0.7]:
    # ascending [0, 2, 1, 3] -> reversed [3, 1, 2, 0]: 3 starts the soup, then 1, 2 and 0 are tried in that order.
    states = [{"w": torch.tensor([float(i)])} for i in range(4)]
    tried = []

    def evaluate(state):
        tried.append(float(state["w"]))  # the mean of the kept ingredients' w plus the candidate's
        return 0.0

    soup, kept, _ = greedy_soup(states, evaluate, [0.5, 0.7, 0.5, 0.7])
    assert kept == [3] and float(soup["w"]) == 3.0
    assert tried == [(3 + 1) / 2, (3 + 2) / 2, (3 + 0) / 2]


class SplitData(pl.LightningDataModule):
    """Train / held-out (carved from training data) / validation splits as tensors."""

    def __init__(self, train, holdout, val):
        super().__init__()
        self.train, self.holdout, self.val = train, holdout, val

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=64)

    def holdout_dataloader(self):
        return DataLoader(self.holdout, batch_size=64)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=64)


def test_soup_selects_on_the_held_out_split_not_the_reported_one():
    torch.manual_seed(0)
    train, holdout, val = fashion_tensors(128, 0), fashion_tensors(96, 2000), fashion_tensors(96, 4000)
    states = fine_tunes(tiny_module("test_resnet").state_dict(), [0.01, 0.3], train)
    probe = tiny_module("test_resnet")

    def score(state, split):
        probe.load_state_dict(state)
        recompute_batchnorm(probe.backbone, [train.tensors[0][:64]])
        return accuracy(probe, split)

    module = tiny_module("test_resnet")
    report = make_soup(module, SplitData(train, holdout, val), states, ["a", "b"], bn_batches=1)
    assert report["ingredient_scores"] == pytest.approx([score(s, holdout) for s in states], abs=1e-6)
    assert report["ingredient_scores"] != pytest.approx([score(s, val) for s in states], abs=1e-6)

    class NoHoldout(SplitData):
        holdout_dataloader = None

    with pytest.raises(ConfigError, match="held-out split carved from the training data"):
        make_soup(module, NoHoldout(train, holdout, val), states, ["a", "b"])


def test_mismatched_soup_ingredients_give_clear_error():
    a = tiny_module("test_resnet").state_dict()
    b = tiny_module("test_vit").state_dict()
    with pytest.raises(ConfigError, match="different architectures"):
        uniform_soup([a, b])
    c = dict(a)
    c["backbone.fc.weight"] = torch.zeros(3, 3)
    with pytest.raises(ConfigError, match="shape mismatches, e.g. backbone.fc.weight"):
        check_compatible([a, c], ["a.ckpt", "c.ckpt"])


def test_recompute_batchnorm_matches_batch_statistics():
    torch.manual_seed(0)
    module = tiny_module("test_resnet")
    images = fashion_tensors(64).tensors[0]
    recompute_batchnorm(module.backbone, [images])
    bn = module.backbone.bn1
    with torch.no_grad():
        pre = module.backbone.conv1(images)
    torch.testing.assert_close(bn.running_mean, pre.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_soup_command_over_cli_checkpoints(tmp_path, run_cli, beton_cache, monkeypatch):
    from tests.conftest import cli_args

    holdout = ["--data.init_args.holdout_fraction", "0.1"]  # the sweep and the soup hold out the same images
    paths = []
    for seed in (0, 1):
        root = tmp_path / f"run{seed}"
        assert run_cli(cli_args(root, beton_cache, "--seed_everything", str(seed), *holdout)) == 0
        paths.append(str(root / "checkpoints" / "last.ckpt"))
    out = tmp_path / "soup.ckpt"
    assert run_cli([
        "soup", "--config", str(CONFIGS / "trainer/debug.yaml"), "--config", str(CONFIGS / "data/fashion_mnist.yaml"),
        "--config", str(CONFIGS / "classification/debug.yaml"), "--data.init_args.loader.init_args.cache_dir", str(beton_cache),
        "--data.init_args.num_workers", "1", "--checkpoints", f"[{paths[0]},{paths[1]}]", "--output", str(out),
        "--bn_batches", "2", *holdout,
    ]) == 0  # `visionlab soup ...`
    saved = torch.load(out, weights_only=False)
    report = saved["soup"]
    assert report["score"] >= max(report["ingredient_scores"])
    assert saved["soup"]["kept"] and "backbone.fc.weight" in saved["state_dict"]
