"""The DataModules' batches pinned before the composition refactor (issue #14 item 2): same pixels, same order.

Each loader back-end (FFCV, torchvision) x batch kind (plain, class-prompt captions, captions file, replayed
crops) is built with a fixed seed; its first training batches (training mode) and first validation batch pass
through ``on_after_batch_transfer`` and are compared, by name, with ``data/batches_before_refactor/*.npz``, which
the DataModules before the refactor wrote (``VISIONLAB_WRITE_PINNED=1 pytest tests/test_batches_unchanged.py``
rewrites them: only for an intended change of behaviour).

Integers (labels, indices, tokens, caption ids, uint8 loader images) must match exactly; normalised images too,
except replayed crops, whose bilinear resampling runs in float: there one uint8 level of difference is allowed
(rounding of a value at .5 may go either way on another CPU). The pinned FFCV training pixels came from FFCV's
unseeded random-resized-crop decoder, so for them only the shape is pinned (their order, labels and every other key
are); that seeded crops repeat is tests/test_ffcv_ops.py's. The torchvision training batches were pinned again when
that back-end took FFCV's order and per-sample seeded crops (sample-exact resume, issue 28); its validation batches
are the pre-refactor ones. The batches are now dicts with the pinned keys plus
the captions-file loaders' ``index`` (``ADDED``), checked against the loader's own.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from datamodules.sources import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from tests.conftest import ffcv_data, torchvision_data

GOLDEN = Path(__file__).with_name("data") / "batches_before_refactor"  # one .npz per back-end and kind
BACKENDS = ("torchvision", "ffcv")
KINDS = ("plain", "prompts", "captions", "replay")
COMMON = dict(image_size=16, batch_size=8, seed=3, rrc_scale=(0.35, 1.0), mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
FASHION = dict(source="fashion_mnist", train_limit=48, val_limit=16)
#: keys the composed DataModules add that the pinned batches lacked: the captions-file loaders' ``index``
#: now stays in the batch (the positional caption layout dropped it); it must equal the loader's index
ADDED = {"captions": ("index",)}


def captions_file(folder: Path, output: Path) -> Path:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    lines = [f"{f.relative_to(folder).as_posix()}\timage {i}\n" + (f"{f.relative_to(folder).as_posix()}\tsecond {i}\n"
             if i % 3 == 0 else "") for i, f in enumerate(files)]
    output.write_text("".join(lines))
    return output


def build(backend: str, kind: str, folder: Path, cache: Path, work: Path):
    """The DataModule of (``backend``, ``kind``), composed: a loader back-end and a batch transform."""
    from datamodules import captions

    ffcv = backend == "ffcv"
    make = ffcv_data if ffcv else torchvision_data
    extra = dict(cache_dir=str(cache), num_workers=1) if ffcv else dict(num_workers=0)
    if kind == "plain":
        return make(**COMMON, **FASHION, **extra)
    if kind == "prompts":
        return make(batches=captions.ClassPrompts(context_length=16), **COMMON, **FASHION, **extra)
    if kind == "captions":
        transform = captions.CaptionsFile(str(captions_file(folder, work / "captions.tsv")), context_length=16)
        return make(batches=transform, source=str(folder), val_fraction=0.25, **COMMON, **extra)
    from app.store_logits import store_logits

    logits = work / "train.vlsl"
    if not logits.exists():
        torch.manual_seed(0)
        teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
        source = ffcv_data(**COMMON, **FASHION, cache_dir=str(cache), num_workers=1)
        source.prepare_data()
        store_logits(source, teacher, 2, 3, logits, device="cpu")
    from datamodules.replay import StoredCrops

    return make(batches=StoredCrops(logits_path=str(logits)), **COMMON, **FASHION, **extra)


def batches(datamodule, train_batches: int = 2) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The first training batches (training mode, epoch 0) and the first validation batch, by name; and the
    loaders' indices (``<split><step>/loaded_index``) where they yield them."""
    from datamodules.base import loader_batch

    datamodule.prepare_data()
    datamodule.setup("fit")
    pl.seed_everything(0, verbose=False)  # torchvision's transforms draw from the global RNG (as under Lightning)
    out, loaded_indices = {}, {}
    for split, loader, count in (("train", datamodule.train_dataloader(), train_batches),
                                 ("val", datamodule.val_dataloader(), 1)):
        datamodule.trainer = SimpleNamespace(training=split == "train", global_rank=0, current_epoch=0, world_size=1)
        for step, batch in zip(range(count), loader):
            loaded = loader_batch(batch)
            out[f"{split}{step}/loaded_image"] = loaded["image"]
            if "index" in loaded:
                loaded_indices[f"{split}{step}/index"] = loaded["index"].long().numpy()
            prepared = datamodule.on_after_batch_transfer(batch, 0)
            assert isinstance(prepared, dict)
            for key, value in prepared.items():
                if isinstance(value, torch.Tensor) and not key.startswith("topk_"):  # stored logits: the file's
                    out[f"{split}{step}/{key}"] = value
        datamodule.trainer = None
    return {key: value.numpy() for key, value in out.items()}, loaded_indices


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("pinned")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_equal_those_before_the_refactor(backend, kind, image_folder, work):
    got, loaded_indices = batches(build(backend, kind, image_folder, work / "cache", work))
    added = sorted(key for key in got if key.split("/")[1] in ADDED.get(kind, ()))
    for key in added:
        np.testing.assert_array_equal(got.pop(key), loaded_indices[key], err_msg=key)
    assert len(added) == (3 if kind in ADDED else 0)  # two training batches and one validation batch
    path = GOLDEN / f"{backend}_{kind}.npz"
    if os.environ.get("VISIONLAB_WRITE_PINNED"):
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **got)
    expected = dict(np.load(path))
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        if backend == "ffcv" and kind != "replay" and key.startswith("train") and key.endswith("image"):
            assert got[key].shape == value.shape and got[key].dtype == value.dtype, key  # crops pinned unseeded: see above
        elif kind == "replay" and key.startswith("train") and key.endswith("/image"):
            levels = np.abs(got[key] - value) * (FASHION_MNIST_STD[0] * 255)  # normalised -> uint8 levels
            assert levels.max() < 1 + 1e-3 and (levels > 1e-3).mean() < 0.01, key
        else:
            np.testing.assert_array_equal(got[key], value, err_msg=key)
