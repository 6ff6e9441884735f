"""Loading user-supplied classes (learners, receivers) by ``package.module:Name`` import path."""

from __future__ import annotations

import importlib
from typing import Any


def import_object(path: str, what: str) -> Any:
    """Import ``package.module:Name``; raise ValueError naming ``what`` and the path if it fails."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what}: {path!r} is not an import path; expected 'package.module:Name'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):  # the module itself is not there
            raise ValueError(
                f"{what}: cannot import module {module_name!r}: "
                f"{'it' if missing == module_name else repr(missing)} is not on the Python path"
            ) from exc
        raise ValueError(f"{what}: cannot import module {module_name!r}: {exc}") from exc
    except ImportError as exc:
        raise ValueError(f"{what}: cannot import module {module_name!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{what}: module {module_name!r} has no attribute {attr!r}") from None
