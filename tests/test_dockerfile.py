"""No Docker engine runs here: check that the image installs what scripts/setup.sh installs (no drift)."""

from __future__ import annotations

import re
import shlex

from tests.conftest import ROOT


def _setup_apt_packages() -> set[str]:
    match = re.search(r'^APT_PACKAGES="([^"]+)"', (ROOT / "scripts" / "setup.sh").read_text(), re.M)
    assert match, "scripts/setup.sh must list its Debian packages in APT_PACKAGES"
    return set(match.group(1).split())


def _docker_runs() -> list[list[str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    runs = []
    for line in text.splitlines():
        if line.strip().startswith("RUN "):
            for part in re.split(r"&&|;", line.strip()[4:]):
                runs.append(shlex.split(part))
    return runs


def test_dockerfile_installs_every_setup_apt_package():
    installed = set()
    for words in _docker_runs():
        if "apt-get" in words and "install" in words:
            installed |= {w for w in words[words.index("install") + 1:] if not w.startswith("-")}
    missing = _setup_apt_packages() - installed
    assert not missing, f"Dockerfile lacks Debian packages that scripts/setup.sh installs: {sorted(missing)}"


def test_dockerfile_installs_the_same_pip_requirements_and_project():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "-r requirements.txt" in setup
    runs = [" ".join(words) for words in _docker_runs()]
    assert any("pip install -r requirements.txt" in r for r in runs)
    assert any("pip install" in r and "-e ." in r for r in runs)
    copies = (ROOT / "Dockerfile").read_text()
    for folder in ("app", "modules", "datamodules", "callbacks", "configs"):
        assert re.search(rf"^COPY {folder} ", copies, re.M), f"Dockerfile does not copy {folder}/"


def test_dockerfile_uses_cuda_pytorch_base_and_visionlab_entrypoint():
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert base.startswith("pytorch/pytorch:") and "cuda" in base
    assert re.search(r'^ENTRYPOINT \["visionlab"\]', text, re.M)
