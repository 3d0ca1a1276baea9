"""Shared fixtures: a small real ImageFolder tree, a session .beton cache, an in-process CLI runner; named
tensor datasets for hand-made batches."""

from __future__ import annotations

import gc
import inspect
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules import sources
from datamodules.base import ImageDataModule
from datamodules.ffcv_loader import FFCVLoader
from datamodules.torchvision_loader import TorchvisionLoader
from modules.components.batches import NamedTensors  # noqa: F401  (the tests import it from here)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def ffcv_data(**kwargs) -> ImageDataModule:
    """``ImageDataModule(loader=FFCVLoader(...))``: the keyword arguments that are ``FFCVLoader``'s (cache_dir,
    write_mode, order...) go to the back-end, the rest to the DataModule."""
    own = set(inspect.signature(FFCVLoader).parameters)
    loader = FFCVLoader(**{k: v for k, v in kwargs.items() if k in own})
    return ImageDataModule(loader=loader, **{k: v for k, v in kwargs.items() if k not in own})


def torchvision_data(**kwargs) -> ImageDataModule:
    """``ImageDataModule(loader=TorchvisionLoader(), **kwargs)``."""
    return ImageDataModule(loader=TorchvisionLoader(), **kwargs)


@pytest.fixture(autouse=True)
def collect_garbage_between_tests():
    """Run finalizers (FFCV's numba dispatchers) here, not inside a later test's parsing (see pyproject)."""
    yield
    gc.collect()


@pytest.fixture(scope="session")
def beton_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("beton-cache")


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """3 classes x 16 real Fashion-MNIST images as PNG (28 px) and JPEG (40 px), one folder per class."""
    root = tmp_path_factory.mktemp("folder")
    data = sources.fashion_mnist("val")
    for label in range(3):
        folder = root / sources.FASHION_MNIST_CLASSES[label].replace("/", "-")
        folder.mkdir()
        for i, idx in enumerate(np.flatnonzero(data.labels == label)[:16]):
            image = Image.fromarray(data.images[idx]).convert("RGB")
            if i % 2:
                image.resize((40, 40)).save(folder / f"{i:03d}.jpg", quality=95)
            else:
                image.save(folder / f"{i:03d}.png")
    return root


def cli_args(root_dir: Path, cache: Path | None, *extra: str, model: str = "classification/debug.yaml",
             data: str = "data/fashion_mnist.yaml", trainer: str = "trainer/debug.yaml", command: str = "fit") -> list[str]:
    """``visionlab`` arguments for a test run; ``cache`` is the FFCV ``.beton`` folder (None for the torchvision
    back-end's data configs, which have none: about half an FFCV CLI test's time is its loader start-up)."""
    return [
        command,
        "--config", str(CONFIGS / trainer),
        "--config", str(CONFIGS / data),
        "--config", str(CONFIGS / model),
        "--trainer.default_root_dir", str(root_dir),  # the default TensorBoard logger follows it (app/cli.py)
        "--trainer.enable_progress_bar", "false",
        *(["--data.init_args.loader.init_args.cache_dir", str(cache)] if cache is not None else []),
        "--data.init_args.num_workers", "1",
        *extra,
    ]


@pytest.fixture
def run_cli(monkeypatch, tmp_path):
    """Run ``visionlab`` in-process from a temp cwd; returns the exit code (0 when it returned normally)."""
    from app.cli import main

    def _run(args: list[str]) -> int:
        monkeypatch.chdir(tmp_path)
        try:
            main(args)
        except SystemExit as exit_:
            return int(exit_.code or 0)
        return 0

    return _run


def one_line_error(capsys, *fragments: str) -> str:
    """The single ``visionlab: error:`` line on stderr (no traceback), containing every fragment."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("visionlab: error:")]
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
