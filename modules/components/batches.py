"""Batches by name: what every technique reads instead of positions (pure Python; no Lightning).

A batch is a dict with at least ``image`` (B, 3, H, W) and ``label`` (B,); loaders that know the sample's
position add ``index`` (B,), captioning adds ``tokens`` (B, L) and ``caption_id`` (B,), replayed stored logits
add ``topk_values``, ``topk_indices``, ``topk_logsumexp`` and ``logits_temperature``.

``named_batch`` passes dicts through and names the positional batches that DataModules and hand-made test
batches still produce, by their documented layouts, until every producer yields dicts (issue #14 item 2).
"""

from __future__ import annotations

LAYOUTS = {
    2: ("image", "label"),  # the labelled DataModules
    3: ("image", "label", "index"),  # loaders with the sample's index (caption folders, replay)
    4: ("image", "tokens", "label", "caption_id"),  # the caption DataModules (datamodules/captions.py)
}


def named_batch(batch) -> dict:
    """``batch`` as a dict (see the module docstring); a lone tensor is an ``image`` batch (predict)."""
    if isinstance(batch, dict):
        return batch
    if not isinstance(batch, (list, tuple)):
        return {"image": batch}
    if len(batch) not in LAYOUTS:
        raise ValueError(f"a positional batch of {len(batch)} items has no named layout: yield a dict")
    return dict(zip(LAYOUTS[len(batch)], batch))
