"""Captions for CLIP, added on the device by a DataModule's ``batches`` transform (chosen by ``class_path``).

Batches reach the module as dicts: the back-end's ``image`` (B, 3, H, W) float, ``label`` (B,) (and ``index``
(B,) when the loaders yield it) plus ``tokens`` (B, L) int64 and ``caption_id`` (B,). ``caption_id`` says which
captions are the same text (retrieval counts any identical caption as a match).

* ``ClassPrompts``: any labelled source (Fashion-MNIST, an ImageFolder); the caption of an image is its class
  name in a prompt template, a random template per training image and the first template for validation.
  The ``.beton`` files are the classifier's: the label -> caption mapping is a table lookup on the batch.
* ``CaptionsFile``: an ImageFolder tree plus a captions file (one or more per image). The loaders yield each
  sample's index; its captions are a table lookup on the batch (the ``.beton`` files are again the classifier's).

Either goes into ``ImageDataModule(batches=ClassPrompts(...))`` whatever its loader back-end (FFCV or
torchvision); the DataModule then exposes ``class_prompt_tokens()`` (C classes x T templates x L) for zero-shot heads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from datamodules.base import BatchTransform
from modules.components.errors import ConfigError, DataError
from modules.components.clip.text import ClipTokenizer, HFTokenizer, make_tokenizer

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a product photo of a {}.",
    "a close-up photo of the {}.",
)


def readable(class_name: str) -> str:
    """Class folder/label names as words: ``T-shirt/top`` -> ``t-shirt or top``, ``ankle_boot`` -> ``ankle boot``."""
    return class_name.replace("/", " or ").replace("_", " ").lower()


def prompt_tokens(tokenizer: ClipTokenizer | HFTokenizer, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """Token ids of every class in every template.  # (C, T, L)"""
    if not templates or any("{}" not in t for t in templates):
        raise ConfigError(f"data.templates {list(templates)} must be a non-empty list of strings containing '{{}}'")
    texts = [template.format(readable(name)) for name in class_names for template in templates]
    return tokenizer(texts).view(len(class_names), len(templates), -1)


class ClassPrompts(BatchTransform):
    """Captions from class names: adds ``tokens`` and ``caption_id`` to each ``image``/``label`` batch.

    Args:
        templates: prompt templates with one ``{}`` for the class name (default: five photo prompts).
        context_length: token ids per caption.
        tokenizer: None or ``clip`` = CLIP's BPE (visionlab's own text tower); a local Hugging Face model directory or
            ``package:<pip package>`` = that model's tokenizer, for its ``HFTextEncoder`` text tower.
    """

    def __init__(self, templates: list[str] | None = None, context_length: int = 32, tokenizer: str | None = None):
        self.templates = list(templates or DEFAULT_TEMPLATES)
        self.tokenizer_source = None if tokenizer == "clip" else tokenizer
        self.tokenizer = make_tokenizer(tokenizer, context_length)

    def bind(self, datamodule) -> None:
        self._class_tokens = prompt_tokens(self.tokenizer, datamodule.class_names, self.templates)
        self._template_rng = torch.Generator().manual_seed(datamodule.seed)

    def class_prompt_tokens(self) -> torch.Tensor:
        """(C, T, L) prompt token ids of every class and template, for the zero-shot head."""
        return self._class_tokens

    def __call__(self, datamodule, batch, training: bool):
        out = datamodule.prepare_batch(batch)
        labels, num_templates = out["label"], len(self.templates)
        if training:
            template = torch.randint(num_templates, labels.shape, generator=self._template_rng).to(labels.device)
        else:
            template = torch.zeros_like(labels)
        tokens = self._class_tokens.to(labels.device)[labels, template]  # (B, L)
        return {**out, "tokens": tokens, "caption_id": labels * num_templates + template}


def read_captions(path: str | Path) -> dict[str, list[str]]:
    """``relative/image/path<TAB>caption`` lines (``#`` comments, blank lines skipped); repeats add captions."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"captions file {path} not found: set data.captions_file to a TSV of '<image path>\\t<caption>'")
    captions: dict[str, list[str]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        key, sep, caption = line.partition("\t")
        if not sep or not caption.strip():
            raise DataError(f"{path}:{number} is not '<image path>\\t<caption>': {line[:80]!r}")
        captions.setdefault(Path(key.strip()).as_posix(), []).append(caption.strip())
    return captions


class _CaptionTable:
    """Every caption of a split, tokenised once: sample i owns rows ``starts[i] : starts[i] + counts[i]``.

    Args:
        tokens: (M, L) token ids of all M captions, grouped by sample.
        counts: (N,) captions per sample (at least one each).
        text_ids: (M,) per caption, the row of the first caption with the same text, so identical texts
            share an id (and with one distinct caption per image it is the sample index).
    """

    def __init__(self, tokens: torch.Tensor, counts: torch.Tensor, text_ids: torch.Tensor):
        self.tokens, self.counts, self.text_ids = tokens, counts, text_ids
        self.starts = torch.cumsum(counts, 0) - counts  # (N,)

    def __len__(self) -> int:
        return len(self.counts)

    def rows(self, indices: torch.Tensor, uniforms: torch.Tensor | None) -> torch.Tensor:
        """Caption rows of samples ``indices`` (B,): a uniform pick per sample, or each one's first when ``None``."""
        starts = self.starts[indices]
        if uniforms is None:
            return starts
        return starts + (uniforms * self.counts[indices]).long().clamp_max(self.counts[indices] - 1)


class CaptionsFile(ClassPrompts):
    """Per-image captions from a captions file, looked up by sample index on the batch.

    The file holds ``<image path relative to source>\\t<caption>`` lines; an image with several lines gets a
    random one per training step and its first for validation. Class folders still name the classes of the
    zero-shot head. ``caption_ids`` mark identical caption texts as the same id (with distinct captions, the
    sample index), so retrieval is scored on the exact pair. The loaders yield each sample's ``index``
    (its position in ``get_source(split)``; FFCV decodes it from the ``.beton`` index, global under DDP).

    Args:
        captions_file: the TSV of captions.
        templates: prompt templates for the zero-shot head.
        context_length: token ids per caption.
        tokenizer: as ``ClassPrompts``.
    """

    yields_index = True

    def __init__(self, captions_file: str, templates: list[str] | None = None, context_length: int = 32,
                 tokenizer: str | None = None):
        super().__init__(templates, context_length, tokenizer)
        self.captions_file = captions_file
        self._tables: dict[str, _CaptionTable] = {}

    def bind(self, datamodule) -> None:
        if datamodule.is_embedded:
            raise ConfigError(f"{type(datamodule).__name__} with a captions file needs an ImageFolder source: use "
                              "class-prompt captions (datamodules.captions.ClassPrompts) for fashion_mnist")
        if datamodule.extra_eval:
            raise ConfigError("data.extra_eval sets have no captions file: drop extra_eval or use ClassPrompts")
        super().bind(datamodule)

    def caption_table(self, datamodule, split: str) -> _CaptionTable:
        """The (cached) captions of ``split``, in the order of ``datamodule.get_source(split)``."""
        if split not in self._tables:
            captions, root = read_captions(self.captions_file), Path(datamodule.source).expanduser()
            texts, counts, missing = [], [], []
            for file in datamodule.get_source(split).files:
                keys = [file.relative_to(root).as_posix()] + [
                    file.relative_to(root / s).as_posix() for s in ("train", "val") if file.is_relative_to(root / s)
                ]
                found = next((captions[k] for k in keys if k in captions), None)
                if found is None:
                    missing.append(keys[0])
                    continue
                texts += found
                counts.append(len(found))
            if missing:
                raise DataError(f"{len(missing)} {split} images have no caption in {self.captions_file} (e.g. {missing[:3]})")
            first_row: dict[str, int] = {}
            text_ids = torch.tensor([first_row.setdefault(text, row) for row, text in enumerate(texts)])  # (M,)
            self._tables[split] = _CaptionTable(self.tokenizer(texts), torch.tensor(counts), text_ids)
        return self._tables[split]

    def setup(self, datamodule, stage: str) -> None:
        for split in ("train", "val"):
            self.caption_table(datamodule, split)

    def __call__(self, datamodule, batch, training: bool):
        out = datamodule.prepare_batch(batch)
        table = self.caption_table(datamodule, "train" if training else "val")
        # The table stays in host memory: only the batch's (B, L) rows travel to the device.
        indices = out["index"].cpu()  # (B,)
        uniforms = torch.rand(len(indices), generator=self._template_rng) if training else None
        rows = table.rows(indices, uniforms)  # (B,)
        tokens = table.tokens[rows].to(out["image"].device)  # (B, L)
        return {**out, "tokens": tokens, "caption_id": table.text_ids[rows].to(out["label"].device)}
