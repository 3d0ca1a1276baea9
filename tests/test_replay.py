"""Stored sparse teacher logits: deterministic crops, exact replay (FFCV and torchvision), the file format, the tool."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import timm
import torch
from torch import nn

from app.store_logits import store_logits
from datamodules.base import loader_batch
from datamodules.replay import StoredCrops, apply_crops, sample_crop_params, with_stored_crops
from datamodules.sources import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from modules.components.kd import sparse_logits
from modules.components.kd.distill import renormalised_sparse_targets, sparse_soft_targets, topk_probabilities
from modules.components.errors import ConfigError, DataError
from modules.components.kd.sparse_logits import SparseLogits, load_sparse_logits, save_sparse_logits

from .conftest import CONFIGS, ffcv_data, torchvision_data

EPOCHS, TOPK, BATCH = 3, 4, 16
DATA = dict(source="fashion_mnist", image_size=32, batch_size=BATCH, num_workers=1, train_limit=64, val_limit=16,
            rrc_scale=(0.35, 1.0), mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, seed=3)
BACKENDS = (ffcv_data, torchvision_data)


def replaying(backend, cache, logits_path=None, decode_size=None, crops_per_image=1, **settings):
    """``backend`` over ``settings`` (default ``DATA``) with ``StoredCrops`` batches (FFCV's ``.beton`` in ``cache``)."""
    extra = {"cache_dir": str(cache)} if backend is ffcv_data else {}
    crops = StoredCrops(None if logits_path is None else str(logits_path), decode_size, crops_per_image)
    return backend(batches=crops, **{**DATA, **settings}, **extra)


# --- parameters and crops --------------------------------------------------------------------------
def test_crop_params_are_a_function_of_seed_index_epoch():
    indices = np.arange(200)
    boxes, flips = sample_crop_params(0, indices, 5, 28, 28, (0.08, 1.0))
    again, again_flips = sample_crop_params(0, indices[::-1], 5, 28, 28, (0.08, 1.0))  # other batch order
    np.testing.assert_array_equal(boxes, again[::-1])
    np.testing.assert_array_equal(flips, again_flips[::-1])
    alone, _ = sample_crop_params(0, [17], 5, 28, 28, (0.08, 1.0))
    np.testing.assert_array_equal(alone[0], boxes[17])
    next_epoch, _ = sample_crop_params(0, indices, 6, 28, 28, (0.08, 1.0))
    other_seed, _ = sample_crop_params(1, indices, 5, 28, 28, (0.08, 1.0))
    assert (next_epoch != boxes).any(axis=1).mean() > 0.9
    assert (other_seed != boxes).any(axis=1).mean() > 0.9
    assert 0.3 < flips.mean() < 0.7
    top, left, height, width = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + height <= 28).all() and (left + width <= 28).all()
    area = height * width / 28**2
    assert area.min() >= 0.06 and area.max() <= 1.0 and area.std() > 0.1
    assert not sample_crop_params(0, indices, 5, 28, 28, hflip=False)[1].any()


def test_crop_params_fall_back_to_a_centre_crop():
    """An area range no crop can meet gives torchvision's fallback: the largest centre crop within ``ratio``."""
    boxes, _ = sample_crop_params(0, np.arange(4), 0, 20, 40, scale=(2.0, 3.0), ratio=(0.75, 1.5))
    np.testing.assert_array_equal(boxes, [[0, 5, 20, 30]] * 4)


def test_apply_crops_copies_pixels_for_unscaled_boxes():
    images = torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8)
    boxes = torch.tensor([[0, 0, 28, 28], [3, 5, 12, 12], [16, 0, 12, 12], [0, 16, 12, 12]])
    flips = torch.tensor([True, False, True, False])
    whole = apply_crops(images[:1], boxes[:1], flips[:1], 28)
    assert torch.equal(whole[0], images[0].flip(-1))
    crops = apply_crops(images[1:], boxes[1:], flips[1:], 12)
    for crop, image, (top, left, height, width), flip in zip(crops, images[1:], boxes[1:].tolist(), flips[1:]):
        expected = image[:, top:top + height, left:left + width]
        assert torch.equal(crop, expected.flip(-1) if flip else expected)
    resized = apply_crops(images, boxes, flips, 32)
    assert resized.shape == (4, 3, 32, 32) and resized.dtype == torch.uint8


# --- the file --------------------------------------------------------------------------------------
def _random_logits(num_samples=10, epochs=3, topk=5, num_classes=1000, seed=0) -> SparseLogits:
    rng = np.random.default_rng(seed)
    stored = SparseLogits.empty(num_samples, epochs, topk, num_classes, {"teacher": "t", "image_size": 32})
    stored.crop_boxes[:] = rng.integers(0, 500, stored.crop_boxes.shape)
    stored.flips[:] = rng.integers(0, 2, stored.flips.shape)
    stored.topk_values[:] = (rng.normal(size=stored.topk_values.shape) * 20).astype(np.float16)
    stored.topk_values[0, 0, :3] = [np.float16(65504), np.float16(-6e-8), np.float16(0.1)]  # extremes, subnormal
    stored.topk_indices[:] = rng.integers(0, num_classes, stored.topk_indices.shape)
    stored.topk_logsumexp[:] = rng.normal(size=stored.topk_logsumexp.shape).astype(np.float32) * 20
    return stored


def test_file_round_trips_bit_exactly(tmp_path):
    stored = _random_logits()
    save_sparse_logits(stored, tmp_path / "train.vlsl")
    loaded = load_sparse_logits(tmp_path / "train.vlsl")
    for name, array in stored.arrays().items():
        read = getattr(loaded, name)
        assert read.dtype == array.dtype and read.shape == array.shape
        assert read.tobytes() == array.tobytes(), name  # bit-identical (float16 included)
    assert loaded.meta == stored.meta and loaded.meta["num_classes"] == 1000
    assert loaded.topk_indices.dtype == np.uint16
    assert SparseLogits.empty(1, 1, 1, 70000).topk_indices.dtype == np.int32


def test_interrupted_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "train.vlsl"
    save_sparse_logits(_random_logits(seed=1), path)
    before = path.read_bytes()

    def interrupted(fd):
        raise KeyboardInterrupt  # e.g. Ctrl-C after the arrays were written, before the rename

    monkeypatch.setattr(sparse_logits.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_sparse_logits(_random_logits(seed=2), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.vlsl"]  # no temp file left behind
    load_sparse_logits(path)


def test_format_1_file_is_refused_with_a_clear_message(tmp_path):
    """Format 1 stored top-k logits without the normaliser: its targets lost the tail mass; it is refused."""
    path = tmp_path / "train.vlsl"
    save_sparse_logits(_random_logits(), path)
    data = path.read_bytes()
    assert sparse_logits.FORMAT_VERSION == 2 and data.count(b'"format": 2') == 1
    path.write_bytes(data.replace(b'"format": 2', b'"format": 1'))  # same length: only the version differs
    with pytest.raises(DataError) as err:
        load_sparse_logits(path)
    message = str(err.value)
    assert "format 1" in message and "tail mass" in message and "store-logits" in message and "\n" not in message


@pytest.mark.parametrize("damage", ["truncated", "flipped_byte", "not_ours"])
def test_damaged_file_is_a_one_line_data_error(tmp_path, damage):
    path = tmp_path / "train.vlsl"
    save_sparse_logits(_random_logits(), path)
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) * 2 // 3]
    elif damage == "flipped_byte":
        data[-100] ^= 0xFF  # inside topk_indices
    else:
        data = bytearray(b"PK\x03\x04" + bytes(100))
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as err:
        load_sparse_logits(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "store-logits" in message


# --- store, then replay ----------------------------------------------------------------------------
class RecordingTeacher(nn.Module):
    """A fixed random linear classifier that keeps every input batch it is given."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(3 * 32 * 32, num_classes)
        self.inputs: list[torch.Tensor] = []

    def forward(self, images):
        self.inputs.append(images.clone())
        return self.head(images.flatten(1)) * 10


def _store_recording(datamodule, output: Path, num_classes: int = 10, topk: int = TOPK):
    """Store with a ``RecordingTeacher``; returns what was stored, the teacher, and its inputs by (index, epoch)."""
    teacher = RecordingTeacher(num_classes)
    stored = store_logits(datamodule, teacher, EPOCHS, topk, output, device="cpu", teacher_name="recording")
    seen = {}  # (index, epoch) -> the normalised crop the teacher saw; the store loader runs in index order
    for call, inputs in enumerate(teacher.inputs):
        batch, epoch = divmod(call, EPOCHS)
        for row, image in enumerate(inputs):
            seen[batch * BATCH + row, epoch] = image
    assert len(seen) == stored.num_samples * EPOCHS
    return stored, teacher, seen


def _assert_replay_is_exact(datamodule, teacher: RecordingTeacher, seen: dict, epochs=(1, EPOCHS + 1)) -> None:
    """Every replayed crop equals the teacher's input for its (index, epoch % K); the logits are the teacher's."""
    datamodule.prepare_data()
    datamodule.setup("fit")
    topk = datamodule.batches.stored.topk
    for epoch in epochs:
        datamodule.batches.replay_epoch = epoch
        checked = 0
        for loaded in datamodule.train_dataloader():
            indices = loader_batch(loaded)["index"]
            batch = datamodule.on_after_batch_transfer(loaded, 0)
            crops, values, classes = batch["image"], batch["topk_values"], batch["topk_indices"]
            assert values.dtype == torch.float32 and classes.dtype == torch.int64 and values.shape == (BATCH, topk)
            assert torch.equal(batch["index"], indices) and batch["logits_temperature"] == 1.0
            for row, index in enumerate(indices.tolist()):
                assert torch.equal(crops[row], seen[index, epoch % EPOCHS])
            logits = teacher.head(crops.flatten(1)) * 10
            expected_values, expected_classes = logits.topk(topk, dim=1)
            # The store ran these crops in other batches: a float32 matmul's rows depend on the batch on CPUs
            # whose kernels block by batch size (AVX-512/AMX oneDNN), so a value may round to the neighbouring
            # float16, at most one float16 ulp (2^-10 of its magnitude) away; a wrong crop or epoch moves it by far more.
            torch.testing.assert_close(values, expected_values.half().float(), rtol=2.0 ** -10, atol=0)
            assert torch.equal(classes, expected_classes)
            # the stored normaliser is the full softmax's, with the top-k at their float16 values
            rounded = logits.scatter(1, classes, values)
            torch.testing.assert_close(batch["topk_logsumexp"], rounded.logsumexp(1), rtol=1e-6, atol=1e-6)
            checked += len(indices)
        assert checked == datamodule.batches.stored.num_samples // BATCH * BATCH  # drop_last keeps whole batches


@pytest.fixture(scope="module")
def stored_run(tmp_path_factory):
    """Logits stored through the FFCV path."""
    cache = tmp_path_factory.mktemp("replay-beton")
    datamodule = ffcv_data(cache_dir=str(cache), **DATA)
    datamodule.prepare_data()
    output = tmp_path_factory.mktemp("logits") / "train.vlsl"
    stored, teacher, seen = _store_recording(datamodule, output)
    return cache, output, stored, seen, teacher


@pytest.mark.parametrize("backend", BACKENDS)
def test_replayed_crops_equal_what_the_teacher_saw(stored_run, backend):
    """Replayed crops are bit-identical to the teacher's inputs, through FFCV and torchvision alike."""
    cache, output, stored, seen, teacher = stored_run
    datamodule = replaying(backend, cache, output)
    _assert_replay_is_exact(datamodule, teacher, seen)  # epoch K + 1 replays stored epoch 1 again
    val = datamodule.on_after_batch_transfer(next(iter(datamodule.val_dataloader())), 0)
    assert sorted(val) == ["image", "label"]  # validation: the back-end's centre crops, no stored logits
    assert val["image"].shape == (BATCH, 3, 32, 32) and val["image"].dtype == torch.float32


def test_both_backends_replay_identical_batches(stored_run):
    """The same StoredCrops on FFCV and on torchvision: the same whole images and, replayed, the same dict."""
    cache, output, _, _, _ = stored_run
    replayed = []
    for backend in BACKENDS:
        datamodule = replaying(backend, cache, output, crops_per_image=2)
        datamodule.prepare_data()
        datamodule.setup("fit")
        datamodule.batches.replay_epoch = 1
        loaded = loader_batch(next(iter(datamodule.full_image_loader())))
        assert loaded["image"].dtype == torch.uint8 and loaded["image"].shape == (BATCH, 3, 28, 28)  # whole images
        assert loaded["index"].tolist() == list(range(BATCH))  # in index order
        replayed.append((loaded, datamodule.on_after_batch_transfer(loaded, 0)))
    (ffcv_loaded, ffcv), (torchvision_loaded, torchvision) = replayed
    assert torch.equal(ffcv_loaded["image"], torchvision_loaded["image"])
    assert sorted(ffcv) == sorted(torchvision) == ["image", "index", "label", "logits_temperature", "topk_indices",
                                                   "topk_logsumexp", "topk_values"]
    assert ffcv["image"].shape == (2 * BATCH, 3, 32, 32)
    for key, value in ffcv.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == torch.float32 or value.dtype == torch.int64, key
            assert value.dtype == torchvision[key].dtype and torch.equal(value, torchvision[key]), key
        else:
            assert value == torchvision[key], key


def test_stored_crops_do_not_combine_with_another_batch_transform():
    from datamodules.captions import ClassPrompts

    with pytest.raises(ConfigError, match="ClassPrompts: stored crops need datamodules.replay.StoredCrops"):
        with_stored_crops(torchvision_data(batches=ClassPrompts(), **DATA))
    with pytest.raises(ConfigError, match="cannot replay augmentations"):
        with_stored_crops(pl.LightningDataModule())


@pytest.mark.parametrize("backend", BACKENDS)
def test_replay_of_mixed_size_image_folder(image_folder, beton_cache, tmp_path, backend):
    """Images of several sizes are decoded as centre squares of ``decode_size``; replay stays exact."""
    settings = {"source": str(image_folder), "train_limit": None, "val_limit": None}
    if backend is ffcv_data:
        unsized = replaying(backend, beton_cache, **settings)
        unsized.prepare_data()
        with pytest.raises(ConfigError, match="batches.init_args.decode_size"):
            unsized.full_image_loader()
    storing = replaying(backend, beton_cache, decode_size=36, **settings)
    storing.prepare_data()
    stored, teacher, seen = _store_recording(storing, tmp_path / "train.vlsl", num_classes=3, topk=2)
    assert stored.meta["decoded_hw"] == [36, 36]
    _assert_replay_is_exact(replaying(backend, beton_cache, tmp_path / "train.vlsl", 36, **settings), teacher, seen, (2,))


def test_several_crops_per_image_replay_stored_epochs_en_plus_j(stored_run):
    """FKD's region-level soft labels: with n crops per image, training epoch e shows every image as stored
    epochs (e n + j) % K, crop-major, each with its own stored logits."""
    cache, output, stored, seen, _ = stored_run
    datamodule = replaying(ffcv_data, cache, output, crops_per_image=2)
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.batches.replay_epoch = 1
    loaded = loader_batch(next(iter(datamodule.train_dataloader())))
    labels, indices = loaded["label"], loaded["index"]
    batch = datamodule.on_after_batch_transfer(loaded, 0)
    assert batch["image"].shape == (2 * BATCH, 3, 32, 32)
    assert torch.equal(batch["index"], indices.repeat(2)) and torch.equal(batch["label"], labels.long().repeat(2))
    for crop in range(2):
        column = (1 * 2 + crop) % EPOCHS  # epochs 2 and 0 of the 3 stored
        for row, index in enumerate(indices.tolist()):
            assert torch.equal(batch["image"][crop * BATCH + row], seen[index, column])
        rows = slice(crop * BATCH, (crop + 1) * BATCH)
        np.testing.assert_array_equal(batch["topk_values"][rows].numpy(), stored.topk_values[indices.numpy(), column].astype(np.float32))
        np.testing.assert_array_equal(batch["topk_logsumexp"][rows].numpy(), stored.topk_logsumexp[indices.numpy(), column])
    too_many = replaying(ffcv_data, cache, output, crops_per_image=EPOCHS + 1)
    too_many.setup("fit")
    with pytest.raises(ConfigError, match="crops_per_image 4 exceeds the 3 stored epochs"):
        too_many.on_after_batch_transfer(loaded, 0)
    with pytest.raises(ConfigError, match="at least 1"):
        StoredCrops(str(output), crops_per_image=0)


class SizedTeacher(nn.Module):
    """A fixed random linear classifier on 48 px inputs that keeps its inputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.head = nn.Linear(3 * 48 * 48, 10)
        self.inputs: list[torch.Tensor] = []

    def forward(self, images):
        self.inputs.append(images.clone())
        return self.head(images.flatten(1))


def test_teacher_sees_the_stored_boxes_at_its_own_resolution_and_normalisation(stored_run, tmp_path):
    cache = stored_run[0]
    datamodule = ffcv_data(cache_dir=str(cache), **DATA)
    datamodule.prepare_data()
    teacher = SizedTeacher()
    stored = store_logits(datamodule, teacher, 1, TOPK, tmp_path / "t48.vlsl", device="cpu", teacher_image_size=48,
                          teacher_mean=(0.5, 0.5, 0.5), teacher_std=(0.25, 0.25, 0.25))
    assert stored.meta["teacher_image_size"] == 48 and stored.meta["teacher_normalisation"] == [[0.5] * 3, [0.25] * 3]
    loaded = loader_batch(next(iter(with_stored_crops(datamodule).full_image_loader())))
    images, rows = loaded["image"], loaded["index"].numpy()
    crops = apply_crops(images, torch.from_numpy(stored.crop_boxes[rows, 0].astype(np.int64)),
                        torch.from_numpy(stored.flips[rows, 0].astype(bool)), 48)
    assert torch.equal(teacher.inputs[0], (crops.float() - 127.5) / 63.75)
    assert stored.topk_values.shape == (64, 1, TOPK)


def test_stored_epochs_differ_and_follow_the_seed(stored_run):
    _, _, stored, _, _ = stored_run
    assert stored.meta["seed"] == DATA["seed"] and stored.meta["decoded_hw"] == [28, 28]
    assert (stored.crop_boxes[:, 0] != stored.crop_boxes[:, 1]).any(axis=1).mean() > 0.8
    boxes, flips = sample_crop_params(DATA["seed"], np.arange(64), 2, 28, 28, DATA["rrc_scale"])
    np.testing.assert_array_equal(stored.crop_boxes[:, 2], boxes)
    np.testing.assert_array_equal(stored.flips[:, 2], flips)


def test_stored_file_rebuilds_the_teachers_target_with_its_true_remainder(stored_run):
    """From the file alone, the rebuilt target of every stored crop is the teacher's softmax (of its float16
    top-k logits) on the stored classes, and its TV distance to that softmax is the tail's unevenness only."""
    _, _, stored, seen, teacher = stored_run
    rows = list(range(0, 64, 7))
    crops = torch.stack([seen[row, 1] for row in rows])
    with torch.no_grad():
        logits = (teacher.head(crops.flatten(1)) * 10).double()  # (R, C)
    values = torch.from_numpy(stored.topk_values[rows, 1].astype(np.float32))
    classes = torch.from_numpy(stored.topk_indices[rows, 1].astype(np.int64))
    lse = torch.from_numpy(stored.topk_logsumexp[rows, 1])
    rebuilt = sparse_soft_targets(topk_probabilities(values, lse), classes, 10).double()
    full = logits.scatter(1, classes, values.double()).softmax(-1)  # the teacher, top-k at float16
    stored_mask = torch.zeros_like(full, dtype=torch.bool).scatter(1, classes, True)
    tail = full.masked_fill(stored_mask, 0.0)
    rest = tail.sum(1, keepdim=True) / (10 - TOPK)
    tv_by_formula = 0.5 * ((rest - tail).abs() * ~stored_mask).sum(1)
    tv = 0.5 * (rebuilt - full).abs().sum(1)
    torch.testing.assert_close(rebuilt.sum(1), torch.ones(len(rows), dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(tv, tv_by_formula, rtol=0, atol=1e-6)
    renormalised = renormalised_sparse_targets(values, classes, 10).double()
    assert (0.5 * (renormalised - full).abs().sum(1) >= tv - 1e-6).all()


def test_logits_of_another_subset_are_refused(stored_run):
    cache, output, _, _, _ = stored_run
    datamodule = replaying(ffcv_data, cache, output, train_limit=48)
    datamodule.prepare_data()
    with pytest.raises(ConfigError, match="num_samples=64 but this data config has 48"):
        datamodule.setup("fit")
    bigger = replaying(torchvision_data, cache, output, image_size=24)
    with pytest.raises(ConfigError, match="image_size"):
        bigger.setup("fit")
    resized = replaying(torchvision_data, cache, output, decode_size=32)  # other pixels
    with pytest.raises(ConfigError, match="decoded_pixels='source' but this data config has 'torchvision centre32'"):
        resized.setup("fit")
    unset = replaying(torchvision_data, cache)
    with pytest.raises(ConfigError, match="data.init_args.batches.init_args.logits_path is not set"):
        unset.setup("fit")


class _RecordTargets(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 10)
        self.seen: list[tuple[int, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch["topk_values"].clone()))
        return self.layer(batch["image"].mean((2, 3))).logsumexp(1).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_trainer_epoch_e_replays_stored_epoch_e_mod_k(stored_run):
    cache, output, stored, _, _ = stored_run
    datamodule = replaying(ffcv_data, cache, output, order="sequential")
    module = _RecordTargets()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=EPOCHS + 1, limit_train_batches=1, limit_val_batches=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=datamodule)
    assert [epoch for epoch, _ in module.seen] == list(range(EPOCHS + 1))
    for epoch, values in module.seen:  # sequential order: the first batch is samples 0..15
        np.testing.assert_array_equal(values.numpy(), stored.topk_values[:BATCH, epoch % EPOCHS].astype(np.float32))


# --- the tool --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory) -> Path:
    """A tiny classifier checkpoint in visionlab's format (``backbone.*`` weights + hyper_parameters)."""
    torch.manual_seed(0)
    backbone = timm.create_model("test_resnet", num_classes=10)
    path = tmp_path_factory.mktemp("teacher") / "teacher.ckpt"
    hparams = {"backbone": "test_resnet", "backbone_kwargs": {}, "num_classes": 10, "image_size": 32}
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}, "hyper_parameters": hparams}, path)
    return path


def _tool_args(cache: Path, teacher: Path, output: Path, *extra: str) -> list[str]:
    return ["store-logits", "--config", str(CONFIGS / "trainer/cpu.yaml"), "--config", str(CONFIGS / "data/fashion_mnist.yaml"),
            "--data.init_args.loader.init_args.cache_dir", str(cache), "--data.init_args.train_limit", "64",
            "--data.init_args.val_limit", "16", "--data.init_args.num_workers", "1",
            "--teacher", str(teacher), "--output", str(output), "--batch_size", "32", *extra]


def test_store_logits_tool_end_to_end(run_cli, stored_run, teacher_checkpoint, tmp_path, capsys):
    cache = stored_run[0]
    output = tmp_path / "out" / "train.vlsl"
    assert run_cli(_tool_args(cache, teacher_checkpoint, output, "--epochs", "2", "--topk", "3")) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith(f"store-logits: wrote {output}") and "64 samples x 2 epochs" in summary
    stored = load_sparse_logits(output)
    assert stored.crop_boxes.shape == (64, 2, 4) and stored.topk_values.shape == (64, 2, 3)
    assert stored.meta["teacher"] == str(teacher_checkpoint) and stored.meta["num_classes"] == 10
    assert (np.diff(stored.topk_values.astype(np.float32), axis=2) <= 0).all()  # descending
    assert all(len(set(row)) == 3 for row in stored.topk_indices.reshape(-1, 3).tolist())
    # the file replays through the student's data config
    replay = with_stored_crops(ffcv_data(**{**DATA, "seed": 0, "rrc_scale": (0.6, 1.0)}, cache_dir=str(cache)), str(output))
    assert isinstance(replay.batches, StoredCrops) and type(replay.loader).__name__ == "FFCVLoader" and replay.seed == 0
    replay.setup("fit")
    assert replay.batches.stored.epochs == 2
    assert with_stored_crops(replay) is replay  # already replaying: itself


def test_store_logits_tool_reports_a_missing_teacher(run_cli, stored_run, tmp_path, capsys):
    code = run_cli(_tool_args(stored_run[0], tmp_path / "missing.ckpt", tmp_path / "x.vlsl", "--epochs", "1"))
    assert code == 2
    err = capsys.readouterr().err
    assert "visionlab: error:" in err and "missing.ckpt" in err
    assert not (tmp_path / "x.vlsl").exists()
