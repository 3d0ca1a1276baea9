"""No Docker engine runs here: check that the image is set up exactly as scripts/setup.sh sets up a machine."""

from __future__ import annotations

import re
import shlex
import tomllib

from tests.conftest import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()
SETUP = (ROOT / "scripts" / "setup.sh").read_text()


def _docker_runs() -> list[list[str]]:
    runs = []
    for line in DOCKERFILE.replace("\\\n", " ").splitlines():
        if line.strip().startswith("RUN "):
            for part in re.split(r"&&|;", line.strip()[4:]):
                runs.append(shlex.split(part))
    return runs


def _pins(text: str) -> dict[str, str]:
    """``name==version`` pins in a text (comments left out), by lower-case package name."""
    text = re.sub(r"#.*", "", text)
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r"\b([A-Za-z][\w.-]*)(?:\[[^\]]*\])?==([\w.+-]+)", text)}


def test_image_runs_the_setup_script_on_the_system_it_targets():
    base = re.search(r"^FROM (\S+)", DOCKERFILE, re.M).group(1)
    # setup.sh installs Debian 12 packages with apt-get and pins torch wheels built for CPython 3.11.
    assert re.fullmatch(r"python:3\.11(\.\d+)?-(slim-)?bookworm", base), base
    assert ["bash", "scripts/setup.sh"] in _docker_runs()
    assert "apt-get install" in SETUP and "-r requirements.txt" in SETUP and "-e ." in SETUP


def test_no_package_version_in_the_image_differs_from_the_setup_pins():
    expected = {**_pins((ROOT / "requirements.txt").read_text()), **_pins(SETUP)}
    assert expected["torch"] == "2.14.1" and "torchvision" in expected
    installed_in_image = _pins(" ".join(" ".join(words) for words in _docker_runs()))
    for name, version in installed_in_image.items():
        assert expected.get(name) == version, f"Dockerfile installs {name}=={version}, setup pins {expected.get(name)}"
    tag = re.search(r"^FROM pytorch/pytorch:([\d.]+)", DOCKERFILE, re.M)  # a PyTorch base image carries torch
    assert tag is None or tag.group(1) == expected["torch"], f"base image torch {tag.group(1)} vs setup {expected['torch']}"


def test_image_copies_everything_setup_and_the_package_need():
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for folder in {p.rstrip("*") for p in packages} | {"scripts", "configs"}:
        assert re.search(rf"^COPY {folder} ", DOCKERFILE, re.M), f"Dockerfile does not copy {folder}/"
    for file in ("requirements.txt", "pyproject.toml", "README.md"):
        assert re.search(rf"^COPY .*\b{re.escape(file)}\b", DOCKERFILE, re.M), f"Dockerfile does not copy {file}"
    copy_lines = [line for line in DOCKERFILE.splitlines() if line.startswith("COPY ")]
    setup_line = next(i for i, line in enumerate(DOCKERFILE.splitlines()) if "scripts/setup.sh" in line and line.startswith("RUN"))
    assert all(DOCKERFILE.splitlines().index(line) < setup_line for line in copy_lines)  # -e . needs the sources


def test_visionlab_is_the_entrypoint():
    assert re.search(r'^ENTRYPOINT \["visionlab"\]', DOCKERFILE, re.M)
