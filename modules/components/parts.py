"""``{class_path, init_args}`` records of injected parts, for checkpoints that load with ``weights_only=True``."""

from __future__ import annotations

import inspect

from torch import nn

from modules.components.errors import ConfigError

PRIMITIVES = (str, int, float, bool, type(None))


def module_spec(module: nn.Module) -> dict:
    """``{class_path, init_args}`` that rebuild ``module`` (a loss, a token masking), from the attributes named
    like its arguments.

    Checkpoints keep primitive hyper-parameters only (``weights_only=True``): numbers, strings, None and
    tuples/lists of them (recorded as lists). Any other value (a tensor ``pos_weight``) is an error rather than
    silently dropped. An argument the module does not keep under its own name (``nn.CrossEntropyLoss``'s
    deprecated ``size_average``) is recorded at its default.
    """
    args = {}
    for name, parameter in list(inspect.signature(type(module).__init__).parameters.items())[1:]:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        value = getattr(module, name, parameter.default)
        if isinstance(value, (tuple, list)) and all(isinstance(v, PRIMITIVES) for v in value):
            value = list(value)
        if value is parameter.empty or not isinstance(value, PRIMITIVES + (list,)):
            raise ConfigError(f"{type(module).__name__}.{name} = {type(value).__name__} cannot be recorded in a "
                              "checkpoint's hyper-parameters: use arguments that are numbers, strings, None or lists of them")
        args[name] = value
    return {"class_path": f"{type(module).__module__}.{type(module).__qualname__}", "init_args": args}
