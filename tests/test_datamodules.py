"""The image DataModule on both back-ends: real Fashion-MNIST and ImageFolder round-trips, splits, atomic writes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from datamodules import sources
from datamodules.base import loader_batch
from datamodules.beton import check_beton, write_atomic, write_beton
from modules.components.errors import DataError
from tests.conftest import ffcv_data, torchvision_data


def _collect(loader):
    images, labels = [], []
    for batch in map(loader_batch, loader):
        images.append(batch["image"])
        labels.append(batch["label"])
    return torch.cat(images), torch.cat(labels)


def test_fashion_mnist_idx_files_are_read_exactly():
    train, val = sources.fashion_mnist("train"), sources.fashion_mnist("val")
    assert len(train) == 60000 and len(val) == 10000
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == np.uint8
    assert np.bincount(train.labels).tolist() == [6000] * 10  # the published class balance
    image, label = val[0]
    assert image.shape == (28, 28, 3) and (image[..., 0] == image[..., 2]).all() and label == int(val.labels[0])


def test_ffcv_roundtrip_labels_identical_and_pixels_close(beton_cache):
    dm = ffcv_data(source="fashion_mnist", image_size=28, val_crop_ratio=1.0, train_limit=300, val_limit=300,
                        batch_size=64, num_workers=1, cache_dir=str(beton_cache))
    dm.prepare_data()
    dm.setup("fit")
    images, labels = _collect(dm.val_dataloader())
    source = dm.get_source("val")
    assert labels.long().tolist() == source.labels.tolist()
    expected = torch.from_numpy(np.stack([source[i][0] for i in range(len(source))])).permute(0, 3, 1, 2)
    assert images.dtype == torch.uint8 and images.shape == expected.shape
    assert (images.float() - expected.float()).abs().mean() < 1.0


def _best_window_errors(output: np.ndarray, image: np.ndarray, side: int) -> tuple[float, float]:
    """Smallest mean |output - resize(window)| over every side x side window of ``image``, and of its mirror."""
    import cv2

    best = []
    for candidate in (image, image[:, ::-1]):
        errors = []
        for top in range(image.shape[0] - side + 1):
            for left in range(image.shape[1] - side + 1):
                window = np.ascontiguousarray(candidate[top:top + side, left:left + side])
                resized = cv2.resize(window, output.shape[:2][::-1], interpolation=cv2.INTER_AREA)
                errors.append(float(np.abs(resized.astype(np.float32) - output).mean()))
        best.append(min(errors))
    return best[0], best[1]


def test_ffcv_train_loader_crops_flips_and_drops_last(beton_cache):
    dm = ffcv_data(source="fashion_mnist", image_size=16, train_limit=300, val_limit=300, batch_size=64,
                        num_workers=1, cache_dir=str(beton_cache))
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 300 // 64
    images, labels = _collect(loader)
    assert images.shape == (256, 3, 16, 16) and images.dtype == torch.uint8
    assert set(labels.long().tolist()) <= set(range(10)) and len(set(labels.long().tolist())) > 1
    # A second epoch is reshuffled.
    _, labels2 = _collect(loader)
    assert labels.tolist() != labels2.tolist()


def test_ffcv_train_images_are_flipped_random_crops_of_the_source(beton_cache):
    # Fixed crop area (a quarter: 14 x 14 of 28 x 28) and square ratio; sequential order keeps sources aligned.
    dm = ffcv_data(source="fashion_mnist", image_size=28, train_limit=64, val_limit=64, batch_size=32,
                        num_workers=1, cache_dir=str(beton_cache), order="sequential", rrc_scale=(0.25, 0.25),
                        rrc_ratio=(1.0, 1.0))
    dm.prepare_data()
    dm.setup("fit")
    images, labels = _collect(dm.train_dataloader())
    source = dm.get_source("train")
    assert labels.tolist() == source.labels[:64].tolist()
    cropped, flips = 0, []
    for i in range(len(images)):
        output = images[i].permute(1, 2, 0).numpy().astype(np.float32)
        image = source[i][0]
        plain, mirror = _best_window_errors(output, image, 14)
        assert min(plain, mirror) < 1.0  # the output is a 14 px window of the source (or its mirror), resized
        cropped += np.abs(output - image.astype(np.float32)).mean() > 4 * max(min(plain, mirror), 0.25)  # not the whole image
        if abs(plain - mirror) > 1.0:  # images that are not left-right symmetric tell a flip apart
            flips.append(mirror < plain)
    assert cropped >= 48
    assert len(flips) >= 16 and 0.2 <= np.mean(flips) <= 0.8  # hflip with p = 0.5


def test_imagefolder_ffcv_jpg_roundtrip_and_torchvision_agree(image_folder, beton_cache):
    common = dict(source=str(image_folder), image_size=28, val_crop_ratio=1.0, val_fraction=0.25, batch_size=8, num_workers=1)
    ffcv_dm = ffcv_data(cache_dir=str(beton_cache), write_mode="jpg", jpeg_quality=95, max_resolution=28, **common)
    tv_dm = torchvision_data(**common)
    assert ffcv_dm.num_classes == tv_dm.num_classes == 3
    ffcv_dm.prepare_data()
    ffcv_dm.setup("fit")
    tv_dm.setup("fit")
    ffcv_images, ffcv_labels = _collect(ffcv_dm.val_dataloader())
    tv_images, tv_labels = _collect(tv_dm.val_dataloader())
    assert ffcv_labels.long().tolist() == tv_labels.tolist() == ffcv_dm.get_source("val").labels.tolist()
    assert ffcv_images.shape == tv_images.shape == (12, 3, 28, 28)
    # JPEG re-encoding and OpenCV-vs-PIL resizing differ slightly; content must match.
    assert (ffcv_images.float() - tv_images.float()).abs().mean() < 8.0
    # Normalisation on the device is shared by both back-ends.
    for loaded in ([ffcv_images[:4], ffcv_labels[:4]], {"image": ffcv_images[:4], "label": ffcv_labels[:4]}):
        batch = ffcv_dm.on_after_batch_transfer(loaded, 0)  # a loader's (images, labels), or already named
        assert sorted(batch) == ["image", "label"]
        assert batch["image"].dtype == torch.float32 and batch["label"].dtype == torch.int64
        assert torch.allclose(ffcv_dm.denormalize(batch["image"]) * 255, ffcv_images[:4].float(), atol=1e-3)
        assert torch.equal(batch["label"], ffcv_labels[:4].long())


def test_imagefolder_split_is_deterministic_and_disjoint(image_folder):
    train = sources.image_folder(image_folder, "train", val_fraction=0.25, seed=3)
    val = sources.image_folder(image_folder, "val", val_fraction=0.25, seed=3)
    again = sources.image_folder(image_folder, "val", val_fraction=0.25, seed=3)
    assert set(train.files).isdisjoint(val.files)
    assert len(train) + len(val) == 48 and len(val) == 12
    assert val.files == again.files and np.bincount(val.labels).tolist() == [4, 4, 4]


def test_class_subset_relabels_in_given_order(beton_cache):
    dm = torchvision_data(source="fashion_mnist", classes=[7, 2], val_limit=100)
    assert dm.num_classes == 2 and dm.class_names == ["Sneaker", "Pullover"]
    val = dm.get_source("val")
    raw = sources.fashion_mnist("val")
    keep = np.flatnonzero(np.isin(raw.labels, [7, 2]))
    assert set(val.labels.tolist()) == {0, 1}
    assert len(val) == 100
    # relabelling: first listed class -> 0
    full = sources.restrict(raw, [7, 2], None, 0, "val")
    assert (raw.labels[keep] == np.where(full.labels == 0, 7, 2)).all()


def test_failed_write_keeps_existing_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "train.beton"
    target.write_bytes(b"good")

    def broken(tmp):
        tmp.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(target, broken)
    assert target.read_bytes() == b"good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.beton"]


def test_interrupted_beton_write_leaves_nothing(tmp_path, monkeypatch):
    from ffcv.writer import DatasetWriter

    source = sources.restrict(sources.fashion_mnist("val"), None, 64, 0, "val")

    def interrupted(self, dataset, **kwargs):
        open(self.fname, "wb").write(b"half a file")
        raise KeyboardInterrupt  # e.g. Ctrl-C half-way through

    monkeypatch.setattr(DatasetWriter, "from_indexed_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_beton(source, tmp_path / "val.beton", num_workers=1)
    assert list(tmp_path.iterdir()) == []


def test_unreadable_image_fails_the_write_instead_of_hanging(image_folder, tmp_path):
    import shutil

    folder = tmp_path / "tree"
    shutil.copytree(image_folder, folder)
    (next(folder.iterdir()) / "broken.jpg").write_bytes(b"not a jpeg")
    source = sources.image_folder(folder, "train", val_fraction=0.0)
    with pytest.raises(DataError, match="broken.jpg"):
        write_beton(source, tmp_path / "train.beton", num_workers=2)
    assert not list(tmp_path.glob("*.beton*")) and not list(tmp_path.glob(".*"))


def test_truncated_beton_is_detected(tmp_path):
    source = sources.restrict(sources.fashion_mnist("val"), None, 64, 0, "val")
    path, skipped = write_beton(source, tmp_path / "val.beton", num_workers=1)
    assert skipped == []
    check_beton(path, 64)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match="corrupt or truncated"):
        check_beton(path, 64)


def test_ffcv_loader_works_under_inference_mode(beton_cache):
    """Trainer.validate/test iterate under torch.inference_mode; FFCV must not hang or fail there."""
    dm = ffcv_data(source="fashion_mnist", image_size=28, val_crop_ratio=1.0, train_limit=300, val_limit=300,
                        batch_size=64, num_workers=1, cache_dir=str(beton_cache))
    dm.prepare_data()
    dm.setup("validate")
    with torch.inference_mode():
        images, labels = _collect(dm.val_dataloader())
    assert images.shape[0] == labels.shape[0] == 300


def test_beton_replaced_under_a_running_loader_is_an_error_not_stale_data(tmp_path):
    """FFCV maps a .beton once: after os.replace it would keep serving the old file (or crash its thread)."""
    dm = ffcv_data(source="fashion_mnist", image_size=28, val_crop_ratio=1.0, train_limit=64, val_limit=64,
                        batch_size=32, num_workers=1, cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.val_dataloader()
    first, _ = _collect(loader)
    _collect(loader)  # a second epoch over the unchanged file is fine
    path = dm.loader.beton_path("val")
    replacement = path.with_name("other.beton")
    write_beton(sources.restrict(sources.fashion_mnist("val"), None, 64, 64, "val"), replacement, num_workers=1)
    os.replace(replacement, path)
    with pytest.raises(DataError, match="replaced, changed or deleted"):
        _collect(loader)


def test_a_dying_ffcv_reader_thread_is_an_error_not_a_hang(tmp_path, monkeypatch):
    import threading

    from ffcv.loader.epoch_iterator import EpochIterator

    dm = ffcv_data(source="fashion_mnist", image_size=28, val_crop_ratio=1.0, train_limit=64, val_limit=96,
                        batch_size=32, num_workers=1, cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.val_dataloader()
    assert len(_collect(loader)[1]) == 96  # a whole epoch still ends normally
    real = EpochIterator.run_pipeline

    def fails_on_the_second_batch(self, b_ix, *args):
        if b_ix == 1:
            raise RuntimeError("injected decoding failure")
        return real(self, b_ix, *args)

    monkeypatch.setattr(EpochIterator, "run_pipeline", fails_on_the_second_batch)
    outcome = {}

    def consume():
        try:
            outcome["batches"] = sum(1 for _ in loader)
        except DataError as err:
            outcome["error"] = str(err)

    worker = threading.Thread(target=consume, daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "the loader hung after its reader thread died"
    assert "stopped before the end of the epoch" in outcome.get("error", ""), outcome


@pytest.mark.parametrize("module", [ffcv_data, torchvision_data])
def test_holdout_split_is_carved_from_training_and_never_trained_on(module, tmp_path):
    dm = module(source="fashion_mnist", image_size=28, val_crop_ratio=1.0, train_limit=200, val_limit=64,
                batch_size=20, num_workers=1, holdout_fraction=0.1, seed=3, hflip=False, rrc_scale=(1.0, 1.0),
                rrc_ratio=(1.0, 1.0), **({"cache_dir": str(tmp_path)} if module is ffcv_data else {}))
    dm.prepare_data()
    dm.setup("fit")
    train, held = dm.holdout_split()
    assert len(held) == 20 and len(train) == 180 and not set(train) & set(held)
    assert sorted([*train, *held]) == list(range(200))
    again = module(source="fashion_mnist", image_size=28, train_limit=200, holdout_fraction=0.1, seed=3,
                   **({"cache_dir": str(tmp_path)} if module is ffcv_data else {}))
    again.prepare_data()
    assert np.array_equal(again.holdout_split()[1], held)  # seeded: every run of a sweep holds out the same images
    held_images, _ = _collect(dm.holdout_dataloader())
    train_images, _ = _collect(dm.train_dataloader())
    assert len(held_images) == 20 and len(train_images) == 180
    source = sources.restrict(sources.fashion_mnist("train"), None, 200, 3, "train")
    expected = torch.stack([torch.from_numpy(np.asarray(source[int(i)][0])) for i in held]).float()
    expected = expected[..., 0] if expected.dim() == 4 else expected  # grey stored as RGB
    torch.testing.assert_close(held_images[:, 0].float(), expected, rtol=0, atol=1.0)  # the held-out pixels, in order
    with pytest.raises(Exception, match="holdout_fraction"):
        module(source="fashion_mnist", train_limit=10, **({"cache_dir": str(tmp_path)} if module is ffcv_data else {})).holdout_dataloader()


def test_named_batch_passes_dicts_and_refuses_positional_batches():
    """Techniques read batches by key: a positional ``[images, labels]`` is an error, not a guess by length."""
    from modules.components.batches import named_batch

    images, labels = torch.zeros(2, 3, 4, 4), torch.tensor([1, 2])
    batch = {"image": images, "label": labels}
    assert named_batch(batch) is batch
    assert named_batch(images)["image"] is images  # predict on raw image tensors
    for positional in ([images, labels], (images, labels), [images, labels, torch.arange(2)]):
        with pytest.raises(TypeError, match="positional batches are not read"):
            named_batch(positional)


def test_transferred_batches_are_named_with_the_loaders_index(tmp_path):
    """Every DataModule batch reaching a technique is a dict; ``index`` is there exactly when the loader yields it."""
    from datamodules.base import BatchTransform

    class KeepIndex(BatchTransform):
        yields_index = True

        def __call__(self, datamodule, batch, training):
            return datamodule.prepare_batch(batch)

    plain = torchvision_data(source="fashion_mnist", val_limit=8, batch_size=4, num_workers=0)
    batch = plain.on_after_batch_transfer(next(iter(plain.val_dataloader())), 0)
    assert sorted(batch) == ["image", "label"] and batch["image"].dtype == torch.float32
    indexed = torchvision_data(source="fashion_mnist", val_limit=8, batch_size=4, num_workers=0, batches=KeepIndex())
    batch = indexed.on_after_batch_transfer(next(iter(indexed.val_dataloader())), 0)
    assert sorted(batch) == ["image", "index", "label"]
    assert batch["index"].dtype == torch.int64 and batch["index"].tolist() == [0, 1, 2, 3]
    named = next(iter(indexed.eval_dataloader("val")))  # feature banks read the loader by name too
    assert sorted(named) == ["image", "index", "label"] and named["image"].dtype == torch.uint8
    assert len(indexed.eval_dataloader("val")) == 2
    with pytest.raises(ValueError, match="loader batch"):
        plain.on_after_batch_transfer([batch["image"]], 0)


def test_proportion_mode_writes_the_same_file_whatever_the_writers_random_state(tmp_path):
    # FFCV's proportion mode picks JPEG or raw per image from the writer process's global NumPy generator, which a
    # forked writer inherits from its parent: the same source gave different files depending on that state
    from ffcv.reader import Reader

    from datamodules.beton import WriteSettings

    source = sources.restrict(sources.fashion_mnist("val"), None, 64, 64, "val")
    modes = []
    for parent_seed in (1, 2):
        np.random.seed(parent_seed)
        path, _ = write_beton(source, tmp_path / f"{parent_seed}.beton", WriteSettings(write_mode="proportion"),
                              num_workers=2)
        modes.append(Reader(str(path)).metadata["f0"]["mode"].copy())  # field 0: the image
    assert 10 < int(modes[0].sum()) < 54  # about half of the 64 images JPEG (mode 1), the rest raw (mode 0)
    np.testing.assert_array_equal(modes[0], modes[1])
