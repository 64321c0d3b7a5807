"""Old import paths kept for one release after the layering redesign (removed in distthink 0.3).

`moved(__name__, {...})` returns a module `__getattr__` (PEP 562) that serves a name from its new home with a
DeprecationWarning naming that home. It is the only way a core module may point at a task (the architecture
test, tests/test_layers.py, allows it here and nowhere else): the lookup is by name, at the moment an old
import runs, so the core itself never depends on a task.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable

REMOVED_IN = "0.3"


def moved(module_name: str, names: dict[str, str]) -> Callable[[str], Any]:
    """names: old attribute -> "new.module:attribute"."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        target_module, attribute = names[name].split(":")
        warnings.warn(f"{module_name}.{name} moved to {target_module}.{attribute}; the old path is removed in "
                      f"distthink {REMOVED_IN}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(target_module), attribute)

    return __getattr__
