"""Every YAML under configs/ parses and type-checks through the CLI in the layers it is meant for.

``--print_config`` makes jsonargparse resolve every ``class_path`` and check every ``init_args`` key and type
against the class signatures, without building models or reading data, so configs that point at
checkpoints or data trees that only exist after other runs (``runs/...``, ImageNet) are checked too. The
technique tests instantiate and run each technique's configs.
"""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import CONFIGS

BASE = ["--config", str(CONFIGS / "trainer/cpu.yaml"), "--config", str(CONFIGS / "data/fashion_mnist.yaml")]
MODEL = ["--config", str(CONFIGS / "classification/debug.yaml")]


def _layers(config):
    folder = config.parent.name
    own = ["--config", str(config)]
    if folder in {"trainer", "data"}:
        return [*BASE, *MODEL, *own]
    if folder == "callbacks":
        return [*BASE, *MODEL, *own]
    if folder == "peft" and config.name not in {"base.yaml", "debug.yaml"}:
        return [*BASE, "--config", str(CONFIGS / "peft/base.yaml"), *own]
    return [*BASE, *own]


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses_and_type_checks(config, run_cli, capsys):
    code = run_cli(["fit", *_layers(config), "--print_config"])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    printed = yaml.safe_load(out)
    own = yaml.safe_load(config.read_text()) or {}
    for section in ("model", "data"):  # the config's own choice of class survives the composition
        if isinstance(own.get(section), dict) and "class_path" in own[section]:
            assert printed[section]["class_path"] == own[section]["class_path"]
