"""
JSON as the control plane reads it, from API bodies and from the state file:
a key repeated in one object and the non-standard constants (NaN, Infinity)
are errors rather than silently last-wins or floats.  Each caller words the
error for its own audience; neither ever echoes the document.
"""

from __future__ import annotations

import json
from typing import Any


class DuplicateKeyError(ValueError):
    """A key appears twice in one JSON object; C{key} is that key."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class ConstantError(ValueError):
    """C{NaN}, C{Infinity} or C{-Infinity}; C{name} is the one found."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise DuplicateKeyError(key)
        result[key] = value
    return result


def _constant(name: str) -> Any:
    raise ConstantError(name)


def loads(text: str) -> Any:
    """
    Parse C{text}.

    @raise json.JSONDecodeError: not JSON at all.
    @raise DuplicateKeyError: a key repeated within one object.
    @raise ConstantError: a non-standard constant.
    @raise RecursionError: nested too deeply.
    """
    return json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant)
