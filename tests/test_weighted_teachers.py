"""WeightedTeachers: a weighted mean of the teachers' tempered softmaxes (uniform: MEAL V2's, as OnlineTeachers)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from modules.components.errors import ConfigError
from modules.components.kd.targets import OnlineTeachers, WeightedTeachers
from tests.conftest import cli_args

HOST = SimpleNamespace(num_classes=2, image_size=4)


class MeanColourTeacher(nn.Module):
    """Logits = a fixed linear map of the image's per-channel means: image b below gets column b of ``columns``."""

    def __init__(self, columns: list[list[float]]):
        super().__init__()
        self.linear = nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor(columns).T)  # (C=2, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(images.mean(dim=(2, 3)))  # (B, 2)


# row b: the logits each teacher gives image b (the images' channel means are one-hot: image b is all channel b)
FIRST = [[0.0, math.log(3.0)], [1.0, -1.0], [2.0, 0.5]]  # image 0: softmax (1/4, 3/4)
SECOND = [[0.0, 0.0], [-1.0, 3.0], [0.3, 0.1]]  # image 0: softmax (1/2, 1/2)
BATCH = {"image": torch.eye(3)[:, :, None, None].expand(3, 3, 4, 4).contiguous()}  # (B=3, 3, 4, 4)


def _bound(source):
    source.bind(HOST)
    return source


def _teachers():
    return [MeanColourTeacher(FIRST), MeanColourTeacher(SECOND)]


def test_target_is_the_weighted_mean_of_tempered_softmaxes():
    source = _bound(WeightedTeachers(teachers=_teachers(), weights=[1.0, 3.0]))
    # image 0 at T = 1 by hand: 0.25 * (1/4, 3/4) + 0.75 * (1/2, 1/2) = (7/16, 9/16)
    assert torch.allclose(source(BATCH, 1.0).probs[0], torch.tensor([0.4375, 0.5625]))
    first, second = torch.tensor(FIRST), torch.tensor(SECOND)
    for temperature in (1.0, 2.0):
        targets = source(BATCH, temperature)
        expected = 0.25 * (first / temperature).softmax(-1) + 0.75 * (second / temperature).softmax(-1)
        assert torch.allclose(targets.probs, expected, atol=1e-7)
        assert torch.allclose(targets.logits, 0.25 * first + 0.75 * second, atol=1e-7)
    # the weights are a share, whatever their scale; the order follows the teachers'
    assert torch.equal(_bound(WeightedTeachers(teachers=_teachers(), weights=[2, 6]))(BATCH, 2.0).probs,
                       source(BATCH, 2.0).probs)
    swapped = _bound(WeightedTeachers(teachers=_teachers(), weights=[3.0, 1.0]))(BATCH, 2.0).probs
    assert not torch.allclose(swapped, source(BATCH, 2.0).probs)


def test_no_weights_is_online_teachers_bit_for_bit():
    teachers = _teachers()
    weighted = _bound(WeightedTeachers(teachers=teachers))
    online = _bound(OnlineTeachers(teachers=teachers))
    for temperature in (1.0, 3.0):
        ours, theirs = weighted(BATCH, temperature), online(BATCH, temperature)
        assert torch.equal(ours.probs, theirs.probs) and torch.equal(ours.logits, theirs.logits)
    equal = _bound(WeightedTeachers(teachers=teachers, weights=[5.0, 5.0]))(BATCH, 3.0)  # explicit uniform: same values
    assert torch.allclose(equal.probs, online(BATCH, 3.0).probs, atol=1e-7)


@pytest.mark.parametrize("weights, fragment", [([1.0, -1.0], "non-negative"), ([0.0, 0.0], "positive sum"),
                                               ([1.0, 2.0, 3.0], "3 weights for 2 teachers"),
                                               ([1.0], "1 weights for 2 teachers")])
def test_bad_weights_are_one_line_config_errors_naming_the_option(weights, fragment):
    with pytest.raises(ConfigError) as error:
        _bound(WeightedTeachers(teachers=_teachers(), weights=weights))
    message = str(error.value)
    assert "targets.init_args.weights" in message and fragment in message and "\n" not in message


def test_cli_fast_dev_run_weighted_teachers_yaml(run_cli, tmp_path):
    """The YAML composes with the trainer and data layers; random test_resnet teachers stand in for its checkpoints."""
    args = cli_args(tmp_path, None, "--trainer.fast_dev_run", "true", "--model.init_args.student", "test_resnet",
                    "--model.init_args.targets.init_args.teachers", "[test_resnet, test_resnet]",
                    "--data.init_args.train_limit", "64", "--data.init_args.val_limit", "64",
                    "--data.init_args.batch_size", "16", "--data.init_args.num_workers", "0",
                    model="kd/weighted_teachers.yaml", data="data/fashion_mnist_torchvision.yaml")
    assert run_cli(args) == 0
