"""Image-text DataModules for CLIP: the labelled DataModules with captions added on the device.

Batches reach the module as ``[images (B, 3, H, W) float, tokens (B, L) int64, labels (B,), caption_ids (B,)]``.
``caption_ids`` say which captions are the same text (retrieval counts any identical caption as a match).

* ``FFCVCaptionDataModule`` / ``TorchvisionCaptionDataModule``: any labelled source (Fashion-MNIST, an
  ImageFolder); the caption of an image is its class name in a prompt template, a random template per
  training image and the first template for validation. The ``.beton`` files are the classifier's: the
  label -> caption mapping is a table lookup on the batch, so nothing is rewritten.
* ``CaptionFolderDataModule`` / ``FFCVCaptionFolderDataModule``: an ImageFolder tree plus a captions file
  (one or more per image). The loaders yield each sample's index; its captions are a table lookup on the
  batch (so the FFCV ``.beton`` files are again the classifier's).

Every one of them exposes ``class_prompt_tokens()`` (C classes x T templates x L) for zero-shot heads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from datamodules.ffcv_datamodule import FFCVDataModule, index_pipeline
from datamodules.torchvision_datamodule import TorchvisionDataModule
from modules.components.errors import ConfigError, DataError
from modules.components.text import ClipTokenizer

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


def prompt_tokens(tokenizer: ClipTokenizer, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """Token ids of every class in every template.  # (C, T, L)"""
    if not templates or any("{}" not in t for t in templates):
        raise ConfigError(f"data.templates {list(templates)} must be a non-empty list of strings containing '{{}}'")
    texts = [template.format(readable(name)) for name in class_names for template in templates]
    return tokenizer(texts).view(len(class_names), len(templates), -1)


class _LabelCaptions:
    """Mixin: turns ``[images, labels]`` batches into ``[images, tokens, labels, caption_ids]``."""

    def _init_captions(self, templates: Sequence[str] | None, context_length: int) -> None:
        self.templates = list(templates or DEFAULT_TEMPLATES)
        self.tokenizer = ClipTokenizer(context_length)
        self._class_tokens = prompt_tokens(self.tokenizer, self.class_names, self.templates)
        self._template_rng = torch.Generator().manual_seed(self.seed)

    def class_prompt_tokens(self) -> torch.Tensor:
        """(C, T, L) prompt token ids of every class and template, for the zero-shot head."""
        return self._class_tokens

    def _training(self) -> bool:
        return bool(self.trainer is not None and self.trainer.training)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels, *_ = super().on_after_batch_transfer(batch, dataloader_idx)
        num_templates = len(self.templates)
        if self._training():
            template = torch.randint(num_templates, labels.shape, generator=self._template_rng).to(labels.device)
        else:
            template = torch.zeros_like(labels)
        tokens = self._class_tokens.to(labels.device)[labels, template]  # (B, L)
        return [images, tokens, labels, labels * num_templates + template]


class FFCVCaptionDataModule(_LabelCaptions, FFCVDataModule):
    """Labelled FFCV data captioned from class names with prompt templates.

    Args:
        templates: prompt templates with one ``{}`` for the class name (default: five photo prompts).
        context_length: token ids per caption.
        **kwargs: the ``FFCVDataModule`` arguments (source, cache_dir, image_size, batch_size...).
    """

    def __init__(self, templates: list[str] | None = None, context_length: int = 32, **kwargs):
        super().__init__(**kwargs)
        self._init_captions(templates, context_length)


class TorchvisionCaptionDataModule(_LabelCaptions, TorchvisionDataModule):
    """Labelled torchvision data captioned from class names with prompt templates.

    Args:
        templates: prompt templates with one ``{}`` for the class name (default: five photo prompts).
        context_length: token ids per caption.
        **kwargs: the ``TorchvisionDataModule`` arguments (source, image_size, batch_size...).
    """

    def __init__(self, templates: list[str] | None = None, context_length: int = 32, **kwargs):
        super().__init__(**kwargs)
        self._init_captions(templates, context_length)


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


class _FolderCaptions:
    """Mixin: per-image captions from a captions file, looked up by sample index on the batch.

    The host DataModule's loaders yield ``[images, labels, indices]`` where ``indices`` are positions in
    ``get_source(split)``; ``on_after_batch_transfer`` turns them into ``[images, tokens, labels, caption_ids]``
    with a random caption of each image for training and its first for validation.
    """

    def _init_folder_captions(self, captions_file: str) -> None:
        if self.is_embedded:
            raise ConfigError(f"{type(self).__name__} needs an ImageFolder source: use a class-prompt caption DataModule for fashion_mnist")
        self.captions_file = captions_file
        self._tables: dict[str, _CaptionTable] = {}

    def caption_table(self, split: str) -> _CaptionTable:
        """The (cached) captions of ``split``, in the order of ``get_source(split)``."""
        if split not in self._tables:
            captions, root = read_captions(self.captions_file), Path(self.source).expanduser()
            texts, counts, missing = [], [], []
            for file in self.get_source(split).files:
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

    def setup(self, stage: str) -> None:
        super().setup(stage)
        for split in ("train", "val"):
            self.caption_table(split)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels = self.prepare_images(batch[0]), batch[1].long().view(-1)
        train = self._training()
        table = self.caption_table("train" if train else "val")
        # The table stays in host memory: only the batch's (B, L) rows travel to the device.
        indices = batch[2].long().view(-1).cpu()  # (B,)
        uniforms = torch.rand(len(indices), generator=self._template_rng) if train else None
        rows = table.rows(indices, uniforms)  # (B,)
        tokens = table.tokens[rows].to(images.device)  # (B, L)
        return [images, tokens, labels, table.text_ids[rows].to(labels.device)]


class CaptionFolderDataModule(_FolderCaptions, TorchvisionCaptionDataModule):
    """An ImageFolder tree with a captions file: each image's own caption(s) instead of class prompts.

    The file holds ``<image path relative to source>\\t<caption>`` lines; an image with several lines gets
    a random one per training step and its first for validation. Class folders still name the classes of
    the zero-shot head. ``caption_ids`` mark identical caption texts as the same id (with distinct
    captions, the sample index), so retrieval is scored on the exact pair.

    Args:
        captions_file: the TSV of captions.
        templates: prompt templates for the zero-shot head.
        context_length: token ids per caption.
        **kwargs: the ``TorchvisionDataModule`` arguments (source must be an ImageFolder path).
    """

    def __init__(self, captions_file: str, templates: list[str] | None = None, context_length: int = 32, **kwargs):
        super().__init__(templates=templates, context_length=context_length, **kwargs)
        self._init_folder_captions(captions_file)

    yields_index = True  # a held-out Subset keeps them positions in get_source(split)


class FFCVCaptionFolderDataModule(_FolderCaptions, FFCVCaptionDataModule):
    """``CaptionFolderDataModule`` through FFCV: the classifier's ``.beton`` files plus a caption lookup.

    The ``.beton`` files hold images and labels only (shared with ``FFCVDataModule`` on the same source);
    an extra loader field decodes each sample's ``.beton`` index from the label column, and the captions
    of that index are looked up on the batch. Indices are global, so DDP sharding keeps them right.

    Args:
        captions_file: the TSV of ``<image path relative to source>\\t<caption>`` lines (one or more per image).
        templates: prompt templates for the zero-shot head.
        context_length: token ids per caption.
        **kwargs: the ``FFCVDataModule`` arguments (source must be an ImageFolder path).
    """

    def __init__(self, captions_file: str, templates: list[str] | None = None, context_length: int = 32, **kwargs):
        super().__init__(templates=templates, context_length=context_length, **kwargs)
        self._init_folder_captions(captions_file)

    def pipelines(self, split: str, train: bool) -> dict:
        """The parent's image and label pipelines plus ``index``: each sample's position in the ``.beton``."""
        return {**super().pipelines(split, train), "index": index_pipeline()}
