"""``visionlab prepare-data``, prepared folders and manifests, ImageNet layouts, bad images through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import sources
from datamodules.base import loader_batch
from tests.conftest import CONFIGS, cli_args, ffcv_data, torchvision_data

DATA = ["--data.init_args.image_size", "32", "--data.init_args.batch_size", "8", "--data.init_args.num_workers", "1",
        "--data.init_args.val_fraction", "0.25", "--data.init_args.loader.init_args.max_resolution", "40"]


def _tree(root: Path, per_class: int = 8) -> Path:
    """3 classes x ``per_class`` real Fashion-MNIST images as 40 px JPEGs."""
    data = sources.fashion_mnist("val")
    for label in range(3):
        folder = root / f"class{label}"
        folder.mkdir(parents=True)
        for i, idx in enumerate(np.flatnonzero(data.labels == label)[:per_class]):
            Image.fromarray(data.images[idx]).convert("RGB").resize((40, 40)).save(folder / f"{i:03d}.jpg", quality=95)
    return root


def _prepare(run_cli, source: Path, output: Path, *extra: str) -> int:
    return run_cli(["prepare-data", "--config", str(CONFIGS / "data/imagefolder.yaml"), "--data.init_args.source",
                    str(source), *DATA, "--output", str(output), "--workers", "2", *extra])


def _one_error_line(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("visionlab: error:")]
    assert len(lines) == 1, err
    assert all(f in lines[0] for f in fragments), lines[0]
    return lines[0]


def test_prepare_data_writes_betons_and_manifest(run_cli, tmp_path, capsys):
    from ffcv.reader import Reader

    from datamodules.beton import beton_checksum

    tree, out = _tree(tmp_path / "tree"), tmp_path / "prepared"
    assert _prepare(run_cli, tree, out, "--data.init_args.loader.init_args.write_mode", "proportion",
                    "--data.init_args.loader.init_args.compress_probability", "0.5") == 0
    printed = capsys.readouterr().out
    assert "estimated" in printed and "images/s" in printed
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train.beton", "val.beton"]  # no temp files
    manifest = json.loads((out / "manifest.json").read_text())
    assert {s: e["samples"] for s, e in manifest["splits"].items()} == {"train": 18, "val": 6}  # 8 - round(8/4) per class
    assert manifest["class_names"] == ["class0", "class1", "class2"] and manifest["num_classes"] == 3
    assert manifest["write"] == {"write_mode": "proportion", "max_resolution": 40, "jpeg_quality": 90,
                                 "compress_probability": 0.5}
    assert manifest["source_fingerprint"]["train"].startswith("folder-")
    reader = Reader(str(out / "train.beton"))
    assert manifest["splits"]["train"]["checksum"] == beton_checksum(reader)
    assert reader.metadata["f1"].tolist() == sorted(reader.metadata["f1"].tolist())  # class-major order
    assert set(reader.metadata["f0"]["mode"].tolist()) == {0, 1}  # proportion: some JPEG (0), some raw (1)


def test_fit_from_prepared_files_after_the_source_tree_is_deleted(run_cli, tmp_path, beton_cache):
    tree, out = _tree(tmp_path / "tree"), tmp_path / "prepared"
    assert _prepare(run_cli, tree, out, "--data.init_args.loader.init_args.write_mode", "jpg") == 0
    shutil.rmtree(tree)
    args = cli_args(tmp_path / "run", beton_cache, "--data.init_args.source", str(tree), "--data.init_args.loader.init_args.prepared",
                    str(out), *DATA, data="data/imagefolder.yaml")
    assert run_cli(args) == 0
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_restart_trusts_the_cache_manifest_without_listing_the_source(tmp_path, monkeypatch):
    tree = _tree(tmp_path / "tree")
    settings = dict(source=str(tree), cache_dir=str(tmp_path / "cache"), image_size=32, batch_size=6, num_workers=1,
                    val_fraction=0.25, write_mode="raw", write_workers=1)
    first = ffcv_data(**settings)
    first.prepare_data()
    first.setup("fit")

    def no_listing(*args, **kwargs):
        raise AssertionError("the source tree was listed")

    with monkeypatch.context() as patch:
        patch.setattr(sources, "_scan", no_listing)
        again = ffcv_data(**settings)
        again.prepare_data()
        again.setup("fit")
        assert len(again.train_dataloader()) == 18 // 6
    # verify_source re-lists and rewrites after a change in the tree.
    shutil.copy(tree / "class0" / "000.jpg", tree / "class0" / "999.jpg")
    changed = ffcv_data(verify_source=True, **settings)
    changed.prepare_data()
    changed.setup("fit")
    assert changed.loader.manifest()["splits"]["train"]["samples"] + changed.loader.manifest()["splits"]["val"]["samples"] == 25


def test_shared_cache_is_prepared_by_one_rank_only(tmp_path):
    shared = ffcv_data(source="fashion_mnist", cache_dir=str(tmp_path))
    local = ffcv_data(source="fashion_mnist", cache_dir=str(tmp_path), cache_shared=False)
    assert shared.prepare_data_per_node is False and local.prepare_data_per_node is True


def test_truncated_jpeg_is_named_or_skipped_with_a_count(run_cli, tmp_path, capsys):
    tree = _tree(tmp_path / "tree")
    bad = tree / "class1" / "003.jpg"
    bad.write_bytes(bad.read_bytes()[:300])  # a truncated download
    out = tmp_path / "prepared"
    assert _prepare(run_cli, tree, out) == 2
    _one_error_line(capsys, str(bad), "skip_unreadable")
    assert not out.exists() or not list(out.iterdir())
    assert _prepare(run_cli, tree, out, "--data.init_args.loader.init_args.skip_unreadable", "true") == 0
    assert "skipped 1 unreadable" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert train["samples"] + val["samples"] == 23 and len(train["skipped"]) + len(val["skipped"]) == 1


def test_unreadable_jpeg_in_fit_is_one_line(run_cli, tmp_path, capsys):
    tree = _tree(tmp_path / "tree")
    (tree / "class2" / "broken.jpg").write_bytes(b"not a jpeg at all")
    code = run_cli(cli_args(tmp_path / "run", tmp_path / "cache", "--data.init_args.source", str(tree), *DATA,
                            data="data/imagefolder.yaml"))
    assert code == 2
    _one_error_line(capsys, "broken.jpg")
    assert not list((tmp_path / "cache").rglob("*.beton"))


def _mode_images() -> dict[str, tuple[Image.Image, np.ndarray]]:
    """Images in awkward modes with the RGB a viewer shows (alpha over white), computed by hand."""
    grey = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))  # (16, 16) ramp 0..240
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:, :8] = (200, 30, 60)
    rgb[:, 8:] = (10, 220, 130)
    alpha = np.zeros((16, 16), np.uint8)
    alpha[8:] = 255
    over_white = np.where(alpha[..., None] == 255, rgb, 255).astype(np.uint8)
    palette = Image.fromarray((grey // 128).astype(np.uint8), "P")
    palette.putpalette([0, 0, 0, 40, 90, 250] + [0] * 762)
    palette.info["transparency"] = 0  # index 0 (black) transparent -> white
    palette_rgb = np.where((grey // 128)[..., None] == 0, 255, np.array([40, 90, 250], np.uint8)).astype(np.uint8)
    return {
        "grey16": (Image.fromarray(grey.astype(np.uint16) * 257), np.repeat(grey[..., None], 3, 2)),
        "cmyk": (Image.fromarray(rgb).convert("CMYK"), rgb),
        "palette": (palette, palette_rgb),
        "rgba": (Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), over_white),
        "la": (Image.fromarray(np.dstack([grey, alpha]), "LA"),
               np.where(alpha[..., None] == 255, np.repeat(grey[..., None], 3, 2), 255).astype(np.uint8)),
    }


def test_cmyk_16bit_palette_and_alpha_images_become_the_right_rgb(run_cli, tmp_path):
    images = _mode_images()
    for split in ("train", "val"):
        for name, (image, _) in images.items():
            folder = tmp_path / "tree" / split / name
            folder.mkdir(parents=True)
            image.save(folder / ("0.jpg" if name == "cmyk" else "0.png"), **({"quality": 100} if name == "cmyk" else {}))
    out = tmp_path / "prepared"
    # as JSON: jsonargparse 4.53 parses a dotted `--data.init_args.loader.init_args.max_resolution null` as 'None'
    assert _prepare(run_cli, tmp_path / "tree", out, "--data.init_args.loader",
                    '{"init_args": {"write_mode": "raw", "max_resolution": null}}') == 0
    dm = ffcv_data(prepared=str(out), image_size=16, val_crop_ratio=1.0, batch_size=8, num_workers=1)
    dm.setup("validate")
    loaded = loader_batch(next(iter(dm.val_dataloader())))
    got, labels = loaded["image"], loaded["label"]
    assert dm.class_names == sorted(images)
    for row, label in enumerate(labels.tolist()):
        name = dm.class_names[label]
        expected = torch.from_numpy(images[name][1]).permute(2, 0, 1).int()
        error = (got[row].int() - expected).abs()
        # raw storage is exact; the CMYK JPEG (quality 100, flat colours) round-trips within a few levels
        assert error.max() <= (6 if name == "cmyk" else 0), (name, error.max())


# --- ImageNet layouts -----------------------------------------------------------------------------

SYNSETS = ["n01440764", "n01443537", "n02119789"]  # tench, goldfish, kit fox


def _imagenet_tree(root: Path) -> tuple[Path, list[int]]:
    """train/<synset>/ with 2 images each, val/ flat with 6 images whose true classes are ``truth``."""
    data = sources.fashion_mnist("val")
    for c, synset in enumerate(SYNSETS):
        (root / "train" / synset).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(data.images[10 * c + i]).save(root / "train" / synset / f"{synset}_{i}.JPEG")
    (root / "val").mkdir()
    truth = [2, 0, 1, 1, 0, 2]
    for i in range(len(truth)):
        Image.fromarray(data.images[100 + i]).save(root / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG")
    return root, truth


def test_flat_val_folder_with_ilsvrc_ground_truth_and_class_index(tmp_path):
    root, truth = _imagenet_tree(tmp_path / "imagenet")
    # The devkit's order (ILSVRC2012_ID - 1) is not the sorted order: kit fox first.
    devkit = [SYNSETS[2], SYNSETS[0], SYNSETS[1]]
    (tmp_path / "index.txt").write_text("".join(f"{s} {i}\n" for i, s in enumerate(devkit)))
    (tmp_path / "gt.txt").write_text("".join(f"{devkit.index(SYNSETS[t]) + 1}\n" for t in truth))
    train = sources.image_folder(root, "train", class_index=str(tmp_path / "index.txt"))
    val = sources.image_folder(root, "val", class_index=str(tmp_path / "index.txt"), val_labels=str(tmp_path / "gt.txt"))
    assert train.classes == val.classes == devkit
    assert [devkit[y] for y in train.labels] == [f.parent.name for f in train.files]  # train follows the map
    assert [devkit[y] for y in val.labels] == [SYNSETS[t] for t in truth]  # val agrees with it
    assert [f.name for f in val.files] == sorted(f.name for f in val.files)
    # Integer ILSVRC IDs without the devkit map would silently mislabel: refused.
    with pytest.raises(Exception, match="class_index"):
        sources.image_folder(root, "val", val_labels=str(tmp_path / "gt.txt"))


def test_flat_val_folder_with_csv_labels_and_class_names(tmp_path):

    root, truth = _imagenet_tree(tmp_path / "imagenet")
    rows = ["ImageId,PredictionString"] + [f"ILSVRC2012_val_{i + 1:08d},{SYNSETS[t]} 1 2 30 40" for i, t in enumerate(truth)]
    (tmp_path / "val.csv").write_text("\n".join(rows) + "\n")  # Kaggle's LOC_val_solution.csv layout
    (tmp_path / "names.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n"
                                        "n02119789 kit fox, Vulpes macrotis\n")
    dm = torchvision_data(source=str(root), val_labels=str(tmp_path / "val.csv"),
                               class_names_file=str(tmp_path / "names.txt"))
    assert dm.class_names == ["tench", "goldfish", "kit fox"]
    assert dm.get_source("val").labels.tolist() == truth
    from datamodules.captions import ClassPrompts

    clip = torchvision_data(source=str(root), val_labels=str(tmp_path / "val.csv"),
                            class_names_file=str(tmp_path / "names.txt"), batches=ClassPrompts(context_length=16))
    assert torch.equal(clip.class_prompt_tokens()[2, 0], clip.batches.tokenizer(["a photo of a kit fox."])[0])


def test_flat_val_folder_without_labels_is_one_line(run_cli, tmp_path, capsys):
    root, _ = _imagenet_tree(tmp_path / "imagenet")
    code = run_cli(cli_args(tmp_path / "run", tmp_path / "cache", "--data.init_args.source", str(root), *DATA,
                            data="data/imagefolder.yaml"))
    assert code == 2
    _one_error_line(capsys, str(root / "val"), "data.val_labels")
