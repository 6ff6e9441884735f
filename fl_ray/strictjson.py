"""Strict JSON for the files a job writes (result.json, rounds.jsonl, checkpoints' ``.json``).

Any JSON parser reads them: NaN and infinities are written as null, NumPy arrays and scalars as lists
and numbers, tuples as lists, and any other value as its string.
"""

from __future__ import annotations

import json
import math
from typing import Any


def strict_json(data: Any, indent: int | None = 2) -> str:
    """``data`` as strict JSON (see the module docstring)."""
    return json.dumps(plain(data), indent=indent, allow_nan=False)


def plain(obj: Any) -> Any:
    """``obj`` as plain JSON values: NaN and infinities None, arrays lists, unknown objects their string."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if hasattr(obj, "tolist"):  # NumPy arrays and scalars
        return plain(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)
