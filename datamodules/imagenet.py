"""ImageNet's file layouts: a flat validation folder with a labels file, synset -> index and synset -> name maps.

Formats read (``#`` comments and blank lines skipped everywhere):

* class-index map (``data.class_index``): JSON ``{"n01440764": 0, ...}``, Keras' ``imagenet_class_index.json``
  (``{"0": ["n01440764", "tench"], ...}``), or text lines ``n01440764 0``. Indices must be 0..K-1. With it,
  train and val labels follow the map whatever order the folders sort in.
* class-names file (``data.class_names_file``): text lines ``n01440764 tench, Tinca tinca`` (the ILSVRC
  ``LOC_synset_mapping.txt`` / ``words.txt``), JSON ``{"n01440764": "tench"}`` or Keras' index JSON. The
  first comma-separated name is used: it is what the prompt "a photo of a {}." reads naturally with.
* validation labels (``data.val_labels``), for ``val/`` as one flat folder of images:
  - ILSVRC ground truth (``ILSVRC2012_validation_ground_truth.txt``): one integer per line, the
    1-based ``ILSVRC2012_ID`` of the image at that position in the sorted file list. The IDs follow the
    devkit's ``meta.mat`` order, not sorted synsets, so a class-index map (synset -> ID - 1) is required.
  - ``file label`` lines (Caffe's ``val.txt``) or a CSV ``file,label`` (a header row is skipped; Kaggle's
    ``LOC_val_solution.csv`` works: its label field starts with the synset). A label is a class folder name
    (synset) or a 0-based class index; a file name may omit its extension.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from modules.components.errors import ConfigError, DataError


def _lines(path: Path) -> list[tuple[int, str]]:
    return [(n, line.strip()) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")]


def _existing(path: str | Path, what: str, key: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{what} {path} not found: set data.{key} to an existing file")
    return path


def _json_pairs(data) -> list[tuple[str, str]]:
    """(synset, value) pairs of a ``{synset: value}`` or Keras ``{"index": [synset, name]}`` JSON."""
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    if all(isinstance(v, list) and len(v) == 2 for v in data.values()):
        return [(str(v[0]), str(v[1]) if not str(k).isdigit() else str(k)) for k, v in data.items()]
    return [(str(k), str(v)) for k, v in data.items()]


def read_class_index(path: str | Path) -> list[str]:
    """The class names (synsets) in label order from a synset -> index map."""
    path = _existing(path, "class-index map", "class_index")
    try:
        if path.suffix == ".json":
            pairs = [(synset, int(index)) for synset, index in _json_pairs(json.loads(path.read_text()))]
        else:
            pairs = []
            for number, line in _lines(path):
                synset, index = line.split()[:2]
                pairs.append((synset, int(index)))
    except (ValueError, TypeError) as err:
        raise DataError(f"{path} is not a synset -> index map ({err}): see datamodules/imagenet.py for the formats") from err
    indices = sorted(index for _, index in pairs)
    if indices != list(range(len(pairs))):
        raise DataError(f"{path}: class indices must be 0..{len(pairs) - 1}, each once")
    return [synset for synset, _ in sorted(pairs, key=lambda pair: pair[1])]


def read_class_names(path: str | Path) -> dict[str, str]:
    """synset -> human-readable name (the first of its comma-separated synonyms)."""
    path = _existing(path, "class-names file", "class_names_file")
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if data and all(isinstance(v, list) and len(v) == 2 for v in data.values()):
            pairs = [(str(v[0]), str(v[1])) for v in data.values()]
        else:
            pairs = [(str(k), str(v)) for k, v in data.items()]
    else:
        pairs = []
        for number, line in _lines(path):
            synset, _, name = line.replace("\t", " ").partition(" ")
            if not name.strip():
                raise DataError(f"{path}:{number} is not '<synset> <name>': {line[:80]!r}")
            pairs.append((synset, name))
    return {synset: name.split(",")[0].strip().replace("_", " ") for synset, name in pairs}


def _label(token: str, classes: list[str], where: str) -> int:
    token = token.split()[0] if token.split() else token
    if token in classes:
        return classes.index(token)
    if token.isdigit() and int(token) < len(classes):
        return int(token)
    raise DataError(f"{where}: label {token!r} is neither a class folder name nor an index below {len(classes)}")


def read_val_labels(path: str | Path, val_dir: Path, classes: list[str], class_index: str | None = None,
                    suffixes: frozenset[str] | set[str] = frozenset({".jpg", ".jpeg", ".png"})) -> tuple[list[Path], list[int]]:
    """Files of the flat ``val_dir`` (those with an image ``suffixes``) and their labels (indices into ``classes``)
    from a labels file.

    ``class_index`` (the map ``classes`` came from) is required for ILSVRC ground truth: its integer IDs
    follow the devkit's order, and reading them against sorted folder names would mislabel silently.
    """
    path = _existing(path, "validation labels file", "val_labels")
    images = sorted(p for p in val_dir.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    if not images:
        raise DataError(f"no images in {val_dir}")
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = [(n, row) for n, row in enumerate(csv.reader(f), 1) if row and not row[0].startswith("#")]
        if rows and rows[0][1][0].strip().lower() in {"file", "filename", "imageid", "image", "path"}:
            rows = rows[1:]
        pairs = [(n, row[0].strip(), row[1].strip() if len(row) > 1 else "") for n, row in rows]
    else:
        lines = _lines(path)
        if lines and all(len(line.split()) == 1 for _, line in lines):  # ILSVRC ground truth: IDs in file order
            if len(lines) != len(images):
                raise DataError(f"{path} has {len(lines)} labels for the {len(images)} images in {val_dir}")
            if not all(line.isdigit() for _, line in lines):
                raise DataError(f"{path}: one label per line must be 1-based ILSVRC2012 IDs")
            if class_index is None:
                raise ConfigError(f"{path} holds ILSVRC2012 IDs, which follow the devkit's meta.mat order: set "
                                  "data.class_index to a synset -> ID - 1 map so train and val labels agree")
            return images, [_label(str(int(line) - 1), classes, f"{path}:{n}") for n, line in lines]
        pairs = [(n, *line.split(None, 1)) for n, line in lines]
    by_name = {p.name: p for p in images} | {p.stem: p for p in images}
    files, labels = [], []
    for number, name, label in pairs:
        file = by_name.get(Path(name).name)
        if file is None:
            raise DataError(f"{path}:{number}: image {name!r} is not in {val_dir}")
        files.append(file)
        labels.append(_label(label, classes, f"{path}:{number}"))
    if len(files) != len(images):
        missing = sorted(set(images) - set(files))
        raise DataError(f"{len(missing)} images in {val_dir} have no label in {path} (e.g. {missing[0].name})")
    order = sorted(range(len(files)), key=lambda i: files[i])
    return [files[i] for i in order], [labels[i] for i in order]
