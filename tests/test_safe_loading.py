"""Checkpoints are unpickled with weights_only=True: a file whose pickle would run code is refused unrun."""

from __future__ import annotations

import os

import pytest
import torch

from modules.components.checkpoints import load_checkpoint, read_state_dict
from modules.components.errors import ConfigError
from modules.components.optim import OptimConfig
from tests.conftest import cli_args


class _CreatesFile:
    """Unpickling this calls ``os.mkdir(path)``: the file system shows whether the pickle ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def _malicious_checkpoint(tmp_path):
    marker = tmp_path / "pickle-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"backbone.fc.weight": torch.zeros(10, 4)}, "hyper_parameters": {"x": _CreatesFile(marker)}}, path)
    return path, marker


def test_a_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path):
    path, marker = _malicious_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match=r"needs posix\.mkdir.*add_safe_globals"):
        read_state_dict(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the control: without weights_only the same file runs its code
    assert marker.exists()


def test_project_hyper_parameter_types_load(tmp_path):
    path = tmp_path / "api.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"optim": OptimConfig(name="sgd", lr=0.1)}}, path)
    assert load_checkpoint(path)["hyper_parameters"]["optim"] == OptimConfig(name="sgd", lr=0.1)


def test_truncated_and_foreign_files_are_one_line_errors(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1000)}}, good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:500])
    with pytest.raises(ConfigError, match="corrupt or not a checkpoint"):
        load_checkpoint(truncated)
    listed = tmp_path / "list.pt"
    torch.save([torch.ones(1)], listed)
    with pytest.raises(ConfigError, match="holds a list"):
        load_checkpoint(listed)


def test_cli_refuses_a_malicious_init_checkpoint(run_cli, tmp_path, beton_cache, capsys):
    path, marker = _malicious_checkpoint(tmp_path)
    code = run_cli(cli_args(tmp_path / "run", beton_cache, "--model.init_args.init_checkpoint", str(path)))
    err = capsys.readouterr().err
    assert code == 2 and not marker.exists(), err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("visionlab: error:")]
    assert len(lines) == 1 and "posix.mkdir" in lines[0] and "Traceback" not in err
    assert not list((tmp_path / "run").rglob("*.ckpt"))


def test_cli_refuses_a_malicious_ckpt_path(run_cli, tmp_path, beton_cache, capsys):
    """Lightning reads --ckpt_path itself (hyper-parameters, then the resume): one line, nothing runs."""
    path, marker = _malicious_checkpoint(tmp_path)
    code = run_cli(cli_args(tmp_path / "run", beton_cache, "--ckpt_path", str(path)))
    err = capsys.readouterr().err
    assert code == 2 and not marker.exists(), err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("visionlab: error:")]
    assert len(lines) == 1 and "posix.mkdir" in lines[0] and "Traceback" not in err
