"""The part contract (modules/components/parts.py): every injected part records what its constructor took and is
rebuilt from that record; old checkpoints (written before the contract and the family folders) still load."""

from __future__ import annotations

import importlib
import io
import pkgutil
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import datamodules
import modules
from modules.components.checkpoints import allowlisted
from modules.components.errors import ConfigError
from modules.components.parts import Part, as_part, build_part, record

LEGACY = Path(__file__).parent / "data" / "legacy_parts"


def _all_part_classes() -> list[type]:
    for package in (modules, datamodules):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            importlib.import_module(info.name)
    found, todo = set(), list(Part.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith(("modules.", "datamodules.")) and cls not in found:
            found.add(cls)
            todo.extend(cls.__subclasses__())
    return sorted(found, key=lambda c: f"{c.__module__}.{c.__qualname__}")


# Parts whose constructor needs arguments (a newcomer's part with required arguments adds its example here).
EXAMPLES = {
    "HFTextEncoder": None,  # loads a Hugging Face model directory: covered by tests/test_clip_pretrained.py
    "CaptionsFile": {"captions_file": "captions.tsv"},
}


def _example(cls: type):
    if cls.__name__ in EXAMPLES:
        return None if EXAMPLES[cls.__name__] is None else cls(**EXAMPLES[cls.__name__])
    return cls()


def _weights_only_roundtrip(value):
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # no allow-list: a record is primitives only


def test_every_part_class_records_and_rebuilds_itself():
    classes = _all_part_classes()
    assert len(classes) >= 25, [c.__name__ for c in classes]  # the walk found the project's parts
    checked = []
    for cls in classes:
        if inspect_abstract(cls):
            continue
        try:
            part = _example(cls)
        except TypeError as err:
            pytest.fail(f"{cls.__qualname__} needs constructor arguments: add an example to EXAMPLES ({err})")
        if part is None:
            continue
        recorded = record(part)
        assert recorded["class_path"] == f"{cls.__module__}.{cls.__qualname__}"
        assert _weights_only_roundtrip(recorded) == recorded
        again = build_part(recorded)
        assert type(again) is cls and record(again) == recorded, cls
        checked.append(cls.__name__)
    for name in ("StoredLogits", "HardLabels", "SoftTargetMix", "SSFTuning", "AdapterTuning", "NormalQuantile",
                 "RandomMasking", "AttentiveMasking", "FFCVLoader", "TorchvisionLoader", "ClassPrompts", "DiffFit"):
        assert name in checked


def test_every_part_binds_to_its_host_through_one_signature():
    """``bind(host)``: one argument, the object the part is injected into, for every kind (no kind-specific lists
    of networks and sizes); the KD, PEFT, CLIP and DataModule hosts call it with themselves."""
    import inspect

    for cls in [Part, *_all_part_classes()]:
        parameters = list(inspect.signature(cls.bind).parameters.values())
        assert len(parameters) == 2 and all(p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty
                                            for p in parameters), f"{cls.__qualname__}.bind{inspect.signature(cls.bind)}"
    for module in ("modules.kd", "modules.peft", "modules.clip", "datamodules.base"):
        source = inspect.getsource(importlib.import_module(module))
        calls = [line.strip() for line in source.splitlines() if ".bind(" in line]
        assert calls and all(line.endswith(".bind(self)") for line in calls), (module, calls)


def inspect_abstract(cls: type) -> bool:
    """Kind bases (``TargetSource``, ``PEFTMethod``...) are not parts one injects."""
    return cls.__name__ in {"KDPart", "TargetSource", "LossTerm", "Mixing", "Projection", "PEFTMethod",
                            "AdapterPlacement", "WeightQuantizer", "TokenMasking", "ContrastiveLoss", "LoaderBackend",
                            "BatchTransform"}


class _Toy(nn.Module, Part):
    def __init__(self, width: int = 4, names: tuple[str, ...] = ("a",), inner: Part | None = None, **extra):
        super().__init__()
        self.hidden = width * 2  # kept under another name: the record still holds the argument


class _ToyChild(_Toy):
    def __init__(self, depth: int = 1):
        super().__init__(width=depth + 10)


@pytest.fixture
def toys_allowed(monkeypatch):
    """The toy parts below live in the tests, outside the packages a record may name."""
    from modules.components import parts

    monkeypatch.setattr(parts, "PACKAGES", parts.PACKAGES + ("tests.",))


def test_record_is_the_constructor_call_not_the_attributes(toys_allowed):
    toy = _Toy(3, ("x", "y"), inner=_ToyChild(2), scale=0.5)
    assert record(toy) == {"class_path": f"{__name__}._Toy", "init_args": {
        "width": 3, "names": ["x", "y"], "scale": 0.5,
        "inner": {"class_path": f"{__name__}._ToyChild", "init_args": {"depth": 2}}}}
    rebuilt = build_part(record(toy))
    assert isinstance(rebuilt.init_args["inner"], _ToyChild) and rebuilt.hidden == 6


def test_what_cannot_be_recorded_is_marked_and_refused_on_rebuild(toys_allowed):
    toy = _Toy(inner=None, teacher=nn.Linear(2, 2))  # an object from Python
    recorded = record(toy)
    assert recorded["init_args"]["teacher"] == {"unrecorded": "Linear"}
    with pytest.raises(ConfigError, match="part.teacher was a Linear object.*pass it again"):
        build_part(recorded)


def test_rebuild_is_allow_listed_and_typed():
    with pytest.raises(ConfigError, match="outside visionlab"):
        build_part({"class_path": "os.system", "init_args": {"command": "true"}})
    from modules.components.kd.targets import StoredLogits, TargetSource
    from modules.components.peft.methods import AdapterTuning, PEFTMethod

    with pytest.raises(ConfigError, match="is not a PEFTMethod"):
        as_part(record(StoredLogits()), PEFTMethod, "model.method")
    assert isinstance(as_part(record(StoredLogits()), TargetSource, "model.targets"), StoredLogits)
    bad_nested = {"class_path": "modules.components.peft.methods.AdapterTuning",
                  "init_args": {"placement": {"class_path": "modules.components.peft.low_bit.UniformGrid"}}}
    with pytest.raises(ConfigError, match="placement cannot be a UniformGrid"):
        as_part(bad_nested, PEFTMethod, "model.method")
    assert isinstance(as_part({"class_path": "modules.components.peft_methods.AdapterTuning"}, PEFTMethod, "m"),
                      AdapterTuning)  # a path from before the family folders


@pytest.mark.parametrize("name, cls_path", [("kd", "modules.kd.DistillationModule"),
                                            ("peft", "modules.peft.PEFTModule"),
                                            ("clip", "modules.clip.CLIPModule"),
                                            ("mr_mae", "modules.mr_mae.MRMAEModule")])
def test_checkpoints_written_before_the_contract_still_load(name, cls_path):
    module_path, _, cls_name = cls_path.rpartition(".")
    cls = getattr(importlib.import_module(module_path), cls_name)
    path = LEGACY / f"{name}.ckpt"
    with warnings.catch_warnings(), allowlisted():
        warnings.simplefilter("ignore")
        model = cls.load_from_checkpoint(path, map_location="cpu", weights_only=True)
        stored = torch.load(path, map_location="cpu", weights_only=True)
    state = model.state_dict()
    renamed = {"model.logit_scale.": "model.loss.logit_scale."}  # CLIP's temperature now lives in its loss object
    old = {next((k.replace(a, b, 1) for a, b in renamed.items() if k.startswith(a)), k): v
           for k, v in stored["state_dict"].items()}
    assert set(state) == set(old)
    assert all(torch.equal(state[k], v) for k, v in old.items())
    # the parts came back with their recorded settings, and record under today's paths
    for key, value in stored["hyper_parameters"].items():
        if isinstance(value, dict) and "class_path" in value:
            now = model.hparams[key]
            assert now["class_path"].rpartition(".")[2] == value["class_path"].rpartition(".")[2]
            assert {k: v for k, v in now["init_args"].items() if k in value["init_args"]
                    and not isinstance(v, dict)} == {k: v for k, v in value["init_args"].items() if not isinstance(v, dict)}
