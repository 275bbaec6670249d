"""Name -> Objective class registry, filled as the modules of sslkit.objectives are imported (all of them, found
by pkgutil: an objective is one file that registers its class)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys

from sslkit.errors import ConfigError, closest

_OBJECTIVES: dict[str, type] = {}
_LOADED = False


def register_objective(name: str):
    def wrap(cls):
        cls.name = name
        _OBJECTIVES[name] = cls
        return cls

    return wrap


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    package = sys.modules[__package__]  # sslkit.objectives, imported before any of its modules
    for info in pkgutil.iter_modules(package.__path__, __package__ + "."):
        importlib.import_module(info.name)
    _LOADED = True


def objective_names() -> list[str]:
    _load_all()
    return sorted(_OBJECTIVES)


def build_objective(spec: dict, encoder, index: int = 0):
    """spec = {name, weight, **options}; options are checked against the class signature."""
    _load_all()
    key = f"objectives[{index}]"
    name = spec.get("name")
    if name not in _OBJECTIVES:
        close = closest(str(name), list(_OBJECTIVES))
        hint = f" (did you mean '{close}'?)" if close else f" (known: {', '.join(sorted(_OBJECTIVES))})"
        raise ConfigError(f"{key}.name: unknown objective '{name}'{hint}")
    cls = _OBJECTIVES[name]
    options = {k: v for k, v in spec.items() if k not in ("name", "weight")}
    params = inspect.signature(cls.__init__).parameters
    for k in options:
        if k not in params or k in ("self", "encoder"):
            close = closest(k, [p for p in params if p not in ("self", "encoder")])
            hint = f" (did you mean '{close}'?)" if close else ""
            raise ConfigError(f"{key}.{k}: not an option of objective '{name}'{hint}")
    try:
        return cls(encoder=encoder, **options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key} ({name}): {e}") from None
