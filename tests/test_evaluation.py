"""Evaluation suite: weighted kNN monitor, ReaL multi-label accuracy, results JSON."""

from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import pytest
import torch

from callbacks.evaluation import EvalResults, ReaLAccuracy, ReaLEvaluation
from callbacks.knn import KNNMonitor, weighted_knn_predict
from tests.conftest import torchvision_data


def test_weighted_knn_votes_by_hand():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[2.0, 0.0]])
    scores = weighted_knn_predict(bank, labels, query, num_classes=3, k=2, temperature=0.5)
    # cosine similarities 1, 0, 1/sqrt(2), -1 -> neighbours 0 (class 0) and 2 (class 1)
    expected = torch.tensor([[math.exp(1 / 0.5), math.exp(2 ** -0.5 / 0.5), 0.0]])
    torch.testing.assert_close(scores, expected)


def test_real_accuracy_counts_set_membership_and_skips_empty_sets():
    metric = ReaLAccuracy()
    logits = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 5.0, 0], [0, 0, 0, 5.0]])
    sets = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    metric.update(logits, sets)
    # image 0: 0 in {0, 3} yes; image 1: empty, left out; image 2: 2 not in {1}; image 3: 3 in {2, 3} yes
    assert metric.compute().item() == pytest.approx(2 / 3)


def test_real_labels_follow_the_batch_index_not_the_loader_order(tmp_path):
    # the streaming back-end serves each worker's block in turn: rows must come from the index, not the count
    (tmp_path / "real.json").write_text(json.dumps([[0], [1], [2], [3]]))
    model = torch.nn.Identity()
    model.num_classes, model.device, logged = 4, torch.device("cpu"), {}
    model.log = lambda name, value: logged.update({name: float(value)})
    trainer = type("Trainer", (), {"world_size": 1, "sanity_checking": False})()
    callback = ReaLEvaluation(str(tmp_path / "real.json"))
    callback.on_validation_epoch_start(trainer, model)
    for order in ([2, 3], [0, 1]):  # image i's logits point at class i: right only if row i is read for it
        batch = {"image": torch.eye(4)[order] * 5, "label": torch.tensor(order), "index": torch.tensor(order)}
        callback.on_validation_batch_end(trainer, model, None, batch, 0)
    callback.on_validation_epoch_end(trainer, model)
    assert logged == {"val/real_acc1": 1.0}  # counting in loader order would read rows 0, 1 for images 2, 3: 0.0


def test_knn_monitor_real_accuracy_and_results_file_through_validate(tmp_path):
    from modules.classification import ClassificationModule

    data = torchvision_data(source="fashion_mnist", train_limit=64, val_limit=32, batch_size=16, num_workers=0)
    data.setup("validate")
    truth = data.get_source("val").labels.tolist()
    sets = [[label] for label in truth]
    sets[0] = []  # an image without a valid label
    (tmp_path / "real.json").write_text(json.dumps(sets))
    pl.seed_everything(0)
    model = ClassificationModule("test_resnet", num_classes=10, image_size=32)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         callbacks=[KNNMonitor(k=5), ReaLEvaluation(str(tmp_path / "real.json")),
                                    EvalResults(str(tmp_path / "results.json"))])
    trainer.validate(model, datamodule=data)
    metrics = trainer.callback_metrics
    assert 0.0 <= float(metrics["val/knn_acc1"]) <= 1.0 and "val/knn_acc5" in metrics
    # ReaL with singleton true-label sets = plain top-1 over the 31 images that keep a label
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(data.normalize(b[0])).argmax(1) for b in data.val_dataloader()])
    expected = sum(int(p) == t for p, t in zip(predictions[1:], truth[1:])) / 31
    assert float(metrics["val/real_acc1"]) == pytest.approx(expected)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["dataset"] == "fashion_mnist" and results["val"]["val/real_acc1"] == pytest.approx(expected)
    assert set(results["val"]) >= {"val/acc1", "val/loss", "val/knn_acc1"}
