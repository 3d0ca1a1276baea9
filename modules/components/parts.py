"""The part contract: how an injected part (a token masking, a KD target source or loss term, a PEFT method, a
weight quantizer, a loader back-end, a batch transform...) is recorded in a checkpoint and rebuilt from it.

One rule for every kind of part:

* **What the constructor takes is what is recorded.** A class derived from :class:`Part` captures the arguments of
  its outermost ``__init__`` call as they were bound to its signature (defaults included), so a subclass cannot
  forget to record one. :func:`record` turns a part into ``{"class_path", "init_args"}`` with primitives only
  (numbers, strings, None, lists and dicts of them, nested parts as nested records, dataclasses as dicts of
  their fields),
  which ``torch.load(weights_only=True)`` reads back.
* **What cannot be recorded says so.** A value that is no primitive and no part (an ``nn.Module`` teacher passed
  from Python, a tensor) is recorded as ``{"unrecorded": "<type>"}``; :func:`build_part` refuses to rebuild such
  a record with a line saying what to pass again, instead of reloading it with a default.
* **One allow-listed rebuild.** :func:`build_part` imports a ``class_path`` only from visionlab's own packages (or
  ``torch.nn``), only if the class is the kind of part the caller expects, and maps the module paths of
  checkpoints written before components were grouped by family.
* **One bind.** A part's host (the LightningModule, DataModule or layer it is injected into) calls
  ``part.bind(host)`` once, after building what the part reads. Every kind has that one signature and meaning:
  the part reads the host's public attributes and builds its own state from them; where the part is made to
  change the host, it changes the host's named submodules (a PEFT method wraps ``host.backbone``). Each kind's
  base class lists the attributes it reads (:meth:`Part.bind`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import os
import typing
from typing import Any

from modules.components.errors import ConfigError

PRIMITIVES = (str, int, float, bool, type(None))
LIBRARY_LOSSES = ("torch.nn.modules.loss", "timm.loss.")  # library objects recorded from their attributes (losses)
PACKAGES = ("modules.", "datamodules.", "callbacks.", *LIBRARY_LOSSES)  # where a recorded class_path may point

from modules.components import LEGACY_MODULES  # noqa: E402  (old module paths -> today's)


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class Part:
    """Base of every injected part: records the arguments its constructor was called with.

    Subclasses write an ordinary typed ``__init__``; nothing else is needed for checkpoints. ``init_args`` is
    the outermost constructor call's arguments bound to its signature, defaults applied.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording(cls.__init__)

    @property
    def init_args(self) -> dict[str, Any]:
        return dict(self.__dict__.get("_part_init_args", {}))

    def record(self) -> dict:
        """``{"class_path", "init_args"}`` with primitives only (see :func:`record`)."""
        return record(self)

    def bind(self, host: Any) -> None:
        """Called once by ``host``, the object this part is injected into, after the host built what it reads.

        What each kind reads: a KD target source ``host.num_classes``/``image_size``; a KD loss term also
        ``host.backbone`` (the student) and ``host.teachers``; a PEFT method ``host.backbone``,
        ``num_classes``, ``image_size`` (it wraps the backbone; a side-tuning sets ``host.side``); a token
        masking ``host.model.image_trunk``; a weight quantizer its ``QuantLinear`` layer; a loader back-end or
        batch transform the DataModule. The part must not keep ``host`` itself (an ``nn.Module`` part would
        register it as a submodule). The default reads nothing.
        """


def _recording(init):
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        if "_part_init_args" not in self.__dict__:  # the outermost call: a subclass's super().__init__ is not it
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            found = dict(list(bound.arguments.items())[1:])
            for name, parameter in signature.parameters.items():  # **kwargs are recorded as keyword arguments
                if parameter.kind is parameter.VAR_KEYWORD:
                    found.update(found.pop(name, {}))
                elif parameter.kind is parameter.VAR_POSITIONAL:
                    found.pop(name, None)
            object.__setattr__(self, "_part_init_args", found)
        init(self, *args, **kwargs)

    return wrapper


def record(value: Any) -> Any:
    """``value`` as checkpoint hyper-parameters: primitives, lists and dicts of them, parts as
    ``{"class_path", "init_args"}``, dataclasses as dicts of their fields; anything else as ``{"unrecorded": "<type>"}`` (refused by :func:`build_part`).

    A plain object that is no :class:`Part` (``nn.CrossEntropyLoss``) is recorded from the attributes named like
    its constructor's arguments, each at its default where the object does not keep it under that name.
    """
    if isinstance(value, PRIMITIVES):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [record(v) for v in value]
    if isinstance(value, dict):
        return {k: record(v) for k, v in value.items()}
    if isinstance(value, Part):
        return {"class_path": class_path(type(value)), "init_args": record(value.init_args)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # a plain dict of the fields: what jsonargparse (and the dataclass itself, ``cls(**fields)``) reads back
        return record({f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.init})
    if type(value).__module__.startswith(LIBRARY_LOSSES):  # ``nn.BCEWithLogitsLoss``, timm's ``BinaryCrossEntropy``
        args = {}
        for name, parameter in list(inspect.signature(type(value).__init__).parameters.items())[1:]:
            if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                args[name] = getattr(value, name, parameter.default)
        if not all(_primitive(v) for v in args.values()):  # a tensor pos_weight: an error rather than dropped
            bad = next(k for k, v in args.items() if not _primitive(v))
            raise ConfigError(f"{type(value).__name__}.{bad} = {type(args[bad]).__name__} cannot be recorded in a "
                              "checkpoint's hyper-parameters: use arguments that are numbers, strings, None or lists of them")
        return {"class_path": class_path(type(value)), "init_args": record(args)}
    return {"unrecorded": type(value).__name__}


def _primitive(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_primitive(v) for v in value)
    return isinstance(value, PRIMITIVES)


def is_record(value: Any) -> bool:
    return isinstance(value, dict) and "class_path" in value


def _resolve(path: str, base: type, what: str) -> type:
    module, _, name = path.rpartition(".")
    module = LEGACY_MODULES.get(module, module)
    if not module.startswith(PACKAGES) and module != "torch.nn":
        raise ConfigError(f"{what}: class_path '{path}' is outside visionlab, torch.nn and timm.loss; visionlab "
                          "rebuilds only its own parts (and library losses) from a checkpoint")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise ConfigError(f"{what}: class_path '{path}' names no class visionlab has: was the checkpoint written "
                          "by a newer visionlab?") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{what}: '{path}' is not a {base.__name__}")
    return cls


def build_part(spec: Any, base: type = Part, what: str = "part") -> Any:
    """The part a :func:`record` made (nested records rebuilt too); an instance of ``base`` is returned as it is.

    Args:
        spec: a record, an instance of ``base``, or None (returned as None).
        base: the kind of part the caller expects (``TargetSource``, ``PEFTMethod``...); a record of another class
            is refused.
        what: the option's name for error messages (``model.targets``).
    """
    if spec is None or (isinstance(spec, base) and not is_record(spec)):
        return spec
    if not is_record(spec):
        raise ConfigError(f"{what} is given as class_path + init_args, got {spec!r}")
    cls = _resolve(spec["class_path"], base, what)
    args = dict(spec.get("init_args") or {})
    for name, value in args.items():
        args[name] = _build_value(value, f"{what}.{name}", _expected(cls, name))
    try:
        return cls(**args)
    except TypeError as err:
        raise ConfigError(f"{what}: {cls.__name__} does not take these init_args ({err})") from None


def _expected(cls: type, name: str) -> tuple[type, ...]:
    """The classes the constructor's annotation of ``name`` allows (``Projection | None`` -> (Projection,))."""
    try:
        hint = typing.get_type_hints(cls.__init__).get(name)
    except Exception:  # an annotation that does not resolve here: no check beyond the allow-list
        return (object,)
    found, todo = [], [hint]
    while todo:
        h = todo.pop()
        if isinstance(h, type) and h is not type(None):
            found.append(h)
        todo.extend(typing.get_args(h))
    return tuple(found) or (object,)


def check_recorded(value: Any, what: str) -> Any:
    """``value`` unless it is the ``{"unrecorded": ...}`` mark of an object a checkpoint could not hold."""
    if isinstance(value, dict) and "unrecorded" in value and len(value) == 1:
        raise ConfigError(f"{what} was a {value['unrecorded']} object, which a checkpoint cannot hold: pass it "
                          "again when loading (e.g. load_from_checkpoint(..., " + what.rpartition(".")[2] + "=...))")
    return value


def _build_value(value: Any, what: str, expected: tuple[type, ...] = (object,)) -> Any:
    check_recorded(value, what)
    if is_record(value):
        part = build_part(value, object, what)
        if not isinstance(part, expected):
            raise ConfigError(f"{what} cannot be a {type(part).__name__}: it takes {' or '.join(c.__name__ for c in expected)}")
        return part
    if isinstance(value, list):
        return [_build_value(v, f"{what}[{i}]", expected) for i, v in enumerate(value)]
    return value


def as_part(value: Any, base: type, what: str) -> Any:
    """A host's constructor argument as a part: the instance itself, built from a record, or None."""
    part = build_part(value, base, what)
    if part is not None and not isinstance(part, base):
        raise ConfigError(f"{what} must be a {base.__name__}, got {type(part).__name__}")
    return part


def module_spec(module) -> dict:
    """Deprecated name of :func:`record` for one part (kept for callers outside visionlab)."""
    return record(module)
