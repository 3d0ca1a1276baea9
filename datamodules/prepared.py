"""Prepared ``.beton`` folders: ``train.beton``, ``val.beton`` and a ``manifest.json`` that describes them.

The manifest (written atomically, last) records the sample counts, classes, class names, write settings,
the data selection, the source fingerprint and a checksum of each file's header and per-sample tables. A
run that finds a complete manifest trusts it without listing the source tree: restarts cost O(1) source
file-system calls, and the source need not exist on the training nodes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from datamodules.beton import WriteSettings, check_beton, default_writers, estimate_seconds, write_beton
from modules.components.errors import ConfigError, DataError
from modules.components.files import write_atomic

MANIFEST = "manifest.json"
FORMAT = "visionlab-prepared/1"
SPLITS = ("train", "val")


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a prepared folder; ``ConfigError`` when it is missing, ``DataError`` when unreadable."""
    path = Path(folder).expanduser() / MANIFEST
    if not path.is_file():
        raise ConfigError(f"{path} not found: write the prepared files with `visionlab prepare-data --config <data.yaml> "
                          f"--output {Path(folder)}`, or unset data.loader.prepared")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is not a readable manifest ({err}): run visionlab prepare-data again") from err
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}: run visionlab prepare-data again")
    return manifest


def complete_manifest(folder: Path) -> dict | None:
    """The manifest when it and all its files exist (no file is opened beyond the manifest), else ``None``."""
    try:
        manifest = read_manifest(folder)
    except (ConfigError, DataError):
        return None
    return manifest if all((folder / entry["file"]).is_file() for entry in manifest["splits"].values()) else None


def check_prepared(folder: Path, manifest: dict) -> None:
    """Check each file against the manifest: complete, sample count and table checksum."""
    for entry in manifest["splits"].values():
        path = folder / entry["file"]
        if not path.is_file():
            raise DataError(f"{path} listed in {folder / MANIFEST} is missing: run visionlab prepare-data again")
        check_beton(path, entry["samples"], entry["checksum"])


def _say(message: str) -> None:
    print(f"visionlab: {message}", flush=True)


def write_prepared(folder: Path, sources: dict, class_names: list[str], settings: WriteSettings, description: dict,
                   num_workers: int | None = None, skip_unreadable: bool = False) -> dict:
    """Write ``folder/<split>.beton`` for each of ``sources`` (split -> image source), then the manifest.

    Prints an estimate before each split (from decoding a few images) and the measured rate after it; FFCV's
    own progress bar counts images per second in between.
    """
    folder = Path(folder)
    writers = num_workers or default_writers()
    splits = {}
    for split, source in sources.items():
        path = folder / f"{split}.beton"
        estimate = estimate_seconds(source, writers)
        _say(f"writing {len(source)} {split} images to {path} with {writers} processes "
             f"({settings.write_mode}); estimated {estimate / 60:.1f} min from decoding alone (encoding adds to it)")
        start = time.perf_counter()
        _, skipped = write_beton(source, path, settings, writers, skip_unreadable)
        seconds = time.perf_counter() - start
        if skipped:
            _say(f"skipped {len(skipped)} unreadable {split} image(s), first: {skipped[0]}")
        samples = len(source) - len(skipped)
        _say(f"wrote {samples} {split} images in {seconds:.1f} s ({samples / max(seconds, 1e-9):.0f} images/s), "
             f"{path.stat().st_size / 2**20:.1f} MiB")
        splits[split] = {"file": path.name, "samples": samples, "checksum": check_beton(path, samples),
                         "bytes": path.stat().st_size, "skipped": skipped, "seconds": round(seconds, 3),
                         "fingerprint": source.fingerprint}
    manifest = {
        "format": FORMAT,
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "classes": list(next(iter(sources.values())).classes),
        "splits": splits,
        "write": settings.as_dict(),
        **description,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_atomic(folder / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
    return manifest
