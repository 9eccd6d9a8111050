"""
The typed readers: each checks one value of a table and returns it typed,
or raises a L{ConfigError} that names the key the value came from.

A reader has the signature C{reader(values, name)} (L{Reader}): it reads the
key C{name} of the effective settings C{values}, so one reader serves a
cluster table, C{[defaults]}, C{[gateway]} and an API body alike.  The
readers of composite values (names and addresses, keys) are in
L{gateway.config.names} and L{gateway.config.keys}.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Mapping
from datetime import date, datetime, time
from typing import Any

from gateway.config.model import (
    MAX_REKEY_BYTES,
    MAX_WINDOW_SIZE,
    MIN_REKEY_BYTES,
    MIN_WINDOW_SIZE,
    MODES,
    PLACEHOLDERS,
    RESOLVER_PLACEHOLDERS,
    ConfigError,
)

_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_SIZE_RE = re.compile(r"([0-9]+)([KMGT]?)", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


# --- naming keys in errors ------------------------------------------------------------


def key_part(name: str) -> str:
    """Quote C{name} the way TOML would need it in a dotted key."""
    if _BARE_KEY_RE.fullmatch(name):
        return name
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    escaped = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in escaped)
    return f'"{escaped}"'


def join(prefix: str, name: str) -> str:
    """The dotted key C{prefix.name} (just C{name} for an API body's top level)."""
    return f"{prefix}.{key_part(name)}" if prefix else key_part(name)


def show(value: str, limit: int = 80) -> str:
    """repr() of a (non-secret) user string, shortened."""
    if len(value) > limit:
        return repr(value[:limit]) + "..."
    return repr(value)


def type_name(value: object) -> str:
    """The TOML name of C{value}'s type, for "expected X, got Y"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, Mapping):
        return "table"
    if isinstance(value, (datetime, date, time)):
        return "date/time"
    return type(value).__name__


def unknown(source: str, key: str, name: str, allowed: tuple[str, ...]) -> ConfigError:
    """The error for an unknown key: the closest known one, or all of them."""
    close = difflib.get_close_matches(name, allowed, n=1)
    if close:
        return ConfigError(source, key, f"unknown key (did you mean {close[0]}?)")
    return ConfigError(source, key, f"unknown key (expected one of: {', '.join(allowed)})")


def table(value: object, source: str, key: str) -> Mapping[str, Any]:
    """C{value}, which must be a table."""
    if not isinstance(value, Mapping):
        raise ConfigError(source, key, f"expected a table, got {type_name(value)}")
    return value


def resolve(path: str, base_dir: str | None) -> str:
    """C{path} with C{~} expanded, relative to C{base_dir}, normalised."""
    path = os.path.expanduser(path)
    if base_dir is not None and not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    return os.path.normpath(path)


# --- the values of one table ----------------------------------------------------------


class Values:
    """
    The effective settings of one table: each key's value and the dotted key
    it came from (C{clusters.a.user} or C{defaults.user}).
    """

    def __init__(self, source: str, base_dir: str | None) -> None:
        self.source = source
        self.base_dir = base_dir
        self.items: dict[str, tuple[Any, str]] = {}

    def add(self, data: Mapping[str, Any], prefix: str) -> None:
        """Take every key of C{data}, named C{prefix.KEY} in errors."""
        for k, v in data.items():
            self.items[k] = (v, join(prefix, k))

    def __contains__(self, name: str) -> bool:
        return name in self.items

    def value(self, name: str) -> Any:
        return self.items[name][0]

    def key(self, name: str) -> str:
        return self.items[name][1]

    def error(self, name_or_key: str, reason: str) -> ConfigError:
        key = self.items[name_or_key][1] if name_or_key in self.items else name_or_key
        return ConfigError(self.source, key, reason)

    def path(self, name: str) -> str:
        """The string value of C{name} as a file path, resolved."""
        return resolve(self.string(name), self.base_dir)

    def string(self, name: str, *, nonempty: bool = True) -> str:
        value = self.value(name)
        if not isinstance(value, str):
            raise self.error(name, f"expected a string, got {type_name(value)}")
        if nonempty and not value:
            raise self.error(name, "must not be empty")
        if not _encodable(value):
            raise self.error(name, _NOT_TEXT)
        return value

    def boolean(self, name: str) -> bool:
        value = self.value(name)
        if not isinstance(value, bool):
            raise self.error(name, f"expected a boolean (true or false), got {type_name(value)}")
        return value

    def strings(self, name: str) -> list[str]:
        value = self.value(name)
        if not isinstance(value, (list, tuple)):
            raise self.error(name, f"expected an array of strings, got {type_name(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not _encodable(item):
                raise ConfigError(
                    self.source,
                    f"{self.key(name)}[{i}]",
                    f"expected a string, got {type_name(item)}" if not isinstance(item, str) else _NOT_TEXT,
                )
        return list(value)


#: Why a string with a lone surrogate (JSON's C{"\\ud800"}) is refused: it
#: is no text, and a key, passphrase or token must be encoded to be used.
_NOT_TEXT = "not valid text (it holds a lone UTF-16 surrogate)"


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


#: Reads key C{name} of C{values}; the result is the settings field C{name}.
Reader = Callable[[Values, str], Any]


# --- readers ------------------------------------------------------------------------------


class _NoReactor:
    """Stands in for the reactor while endpoint strings are only parsed."""


#: Twisted's C{systemd:} endpoint looks its C{index} or C{name} up among the descriptors handed over at start-up.
_NOT_INHERITED = (
    "names no socket this process inherited (LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID from systemd's "
    "socket activation: see docs/operating.md)"
)


def _check_endpoint(description: str) -> str | None:
    """Why C{description} is not a server endpoint (a reason naming it), or None."""
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(_NoReactor(), description)
    except Exception as e:  # noqa: BLE001 - plugins raise anything
        if isinstance(e, (IndexError, KeyError)) and description.startswith("systemd:"):
            return f"{show(description)} {_NOT_INHERITED}"
        return f"{show(description)} is not a valid server endpoint ({e.__class__.__name__}: {e})"
    return None


def endpoint_items(value: object, key: str, source: str) -> list[tuple[str, str]]:
    """
    The server endpoint strings of a listener key (C{[listen] socks}, a
    cluster's C{socks}): a string or an array of them, C{""} or C{[]} for
    none; each with its dotted key, each a valid endpoint, none twice.
    """
    if isinstance(value, str):
        items = [(value, key)] if value else []
    elif isinstance(value, (list, tuple)):
        items = [(item, f"{key}[{i}]") for i, item in enumerate(value)]
    else:
        raise ConfigError(source, key, f"expected a string or an array of strings, got {type_name(value)}")
    seen: set[str] = set()
    for item, item_key in items:
        if not isinstance(item, str):
            raise ConfigError(source, item_key, f"expected a string, got {type_name(item)}")
        if not item:
            raise ConfigError(source, item_key, 'empty endpoint (use [] or "" to disable the listener)')
        problem = _check_endpoint(item)
        if problem is not None:
            raise ConfigError(source, item_key, problem)
        if item in seen:
            raise ConfigError(source, item_key, f"{show(item)} is given twice")
        seen.add(item)
    return items


def read_endpoints(values: Values, name: str) -> tuple[str, ...]:
    return tuple(item for item, _ in endpoint_items(values.value(name), values.key(name), values.source))


_DOMAIN_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def read_domain(values: Values, name: str) -> str:
    """A DNS suffix such as C{gw.internal}: lower case, no trailing dot, LDH labels."""
    text = values.string(name)
    domain = text.lower().removesuffix(".")
    labels = domain.split(".")
    if len(domain) > 200 or not all(_DOMAIN_LABEL_RE.fullmatch(label) for label in labels):
        raise values.error(name, f"{show(text)} is not a DNS domain (letters, digits and '-' in dot-separated labels)")
    if labels[-1].isdigit():
        raise values.error(name, f"{show(text)} looks like an address, not a DNS domain")
    return domain


def read_boolean(values: Values, name: str) -> bool:
    return values.boolean(name)


def read_path(values: Values, name: str) -> str:
    return values.path(name)


def read_seconds(values: Values, name: str, *, zero: str | None = None, minimum: float = 0.0) -> float:
    """
    A duration in seconds: a finite number > 0 (and >= C{minimum}), or 0 too
    if C{zero} says what 0 means.
    """
    value = values.value(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise values.error(name, f"expected a number of seconds, got {type_name(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float
        number = math.inf
    if zero is not None and number == 0:
        return 0.0
    if not math.isfinite(number) or number <= 0 or number < minimum:
        if zero is None:
            if minimum:
                raise values.error(name, f"must be at least {minimum:g} seconds, got {value}")
            raise values.error(name, f"must be a positive number of seconds, got {value}")
        if minimum:
            raise values.error(name, f"must be 0 ({zero}) or at least {minimum:g} seconds, got {value}")
        raise values.error(name, f"must be 0 ({zero}) or a positive number of seconds, got {value}")
    return number


def read_integer(values: Values, name: str, *, low: int, high: int) -> int:
    value = values.value(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise values.error(name, f"expected an integer, got {type_name(value)}")
    if not low <= value <= high:
        raise values.error(name, f"must be between {low} and {high}, got {value}")
    return value


def read_window_size(values: Values, name: str) -> int:
    value = values.value(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise values.error(name, f"expected an integer (bytes), got {type_name(value)}")
    if not MIN_WINDOW_SIZE <= value <= MAX_WINDOW_SIZE:
        raise values.error(
            name, f"must be between {MIN_WINDOW_SIZE} (32 KiB) and {MAX_WINDOW_SIZE} (64 MiB), got {value}"
        )
    return value


def parse_size(text: str) -> int:
    """
    Parse a size in bytes written like OpenSSH's RekeyLimit: digits with an
    optional suffix K, M, G or T (powers of 1024, either case): C{"512M"}.

    @raise ValueError: with a reason that may be shown to the operator.
    """
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise ValueError(
            f"{show(text)} is not a size: write a whole number of bytes with an optional suffix "
            'K, M, G or T (powers of 1024), e.g. "512M"'
        )
    digits = m.group(1).lstrip("0") or "0"
    if len(digits) > 20:  # far beyond any limit; spares int() a huge string
        return MAX_REKEY_BYTES * 1024
    return int(digits) * _SIZE_UNITS[m.group(2).upper()]


def read_rekey_bytes(values: Values, name: str) -> int:
    value = values.value(name)
    if isinstance(value, str):
        try:
            size = parse_size(value)
        except ValueError as e:
            raise values.error(name, str(e)) from None
        shown = f"{show(value)} ({size} bytes)"
    elif isinstance(value, bool) or not isinstance(value, int):
        raise values.error(name, f'expected an integer (bytes) or a size string such as "1G", got {type_name(value)}')
    else:
        size, shown = value, str(value)
    if not MIN_REKEY_BYTES <= size <= MAX_REKEY_BYTES:
        raise values.error(
            name, f"must be between {MIN_REKEY_BYTES} (1M) and {MAX_REKEY_BYTES} (1T) bytes, got {shown}"
        )
    return size


def read_mode(values: Values, name: str) -> str:
    mode = values.string(name, nonempty=False)
    if mode not in MODES:
        raise values.error(name, f"unknown mode {show(mode)} (expected one of: {', '.join(MODES)})")
    return mode


def _check_template(
    values: Values, name: str, text: str, required: tuple[str, ...], placeholders: tuple[str, ...] = PLACEHOLDERS
) -> str:
    """
    Check a command template: C{placeholders} (C{{host}} and C{{port}}
    unless told otherwise) are the only placeholders, C{{{} and C{}}}
    literal braces; C{required} must be used.  What passes is safe for
    C{text.format(...)} with the values of C{placeholders}.
    """
    names = " and ".join("{" + p + "}" for p in placeholders)
    hint = f"only {names} {'is' if len(placeholders) == 1 else 'are'} replaced; write {{{{ and }}}} for literal braces"
    found: set[str] = set()
    i = 0
    while i < len(text):
        c = text[i]
        if c in "{}" and text[i + 1 : i + 2] == c:
            i += 2
        elif c == "}":
            raise values.error(name, f"unmatched '}}' at character {i + 1} of {show(text)} ({hint})")
        elif c == "{":
            ends = [j for j in (text.find("{", i + 1), text.find("}", i + 1)) if j != -1]
            end = min(ends, default=-1)
            if end == -1 or text[end] == "{":
                raise values.error(name, f"unmatched '{{' at character {i + 1} of {show(text)} ({hint})")
            placeholder = text[i + 1 : end]
            if placeholder not in placeholders:
                raise values.error(name, f"unknown placeholder {show('{' + placeholder + '}')} ({hint})")
            found.add(placeholder)
            i = end + 1
        else:
            i += 1
    for placeholder in required:
        if placeholder not in found:
            raise values.error(name, f"{show(text)} lacks the {{{placeholder}}} placeholder")
    return text


def read_exec_command(values: Values, name: str) -> str:
    text = values.string(name)
    if not text.strip():
        raise values.error(name, "must not be empty")
    return _check_template(values, name, text, PLACEHOLDERS)


def read_proxy_command(values: Values, name: str) -> str | None:
    text = values.string(name, nonempty=False)
    if not text.strip():
        raise values.error(name, 'must not be empty (write "none" for no proxy command)')
    if text == "none":
        return None
    return _check_template(values, name, text, ())


def read_resolver_command(values: Values, name: str) -> str:
    text = values.string(name, nonempty=False)
    if not text:
        return ""  # names are not resolved on the proxy node
    if not text.strip():
        raise values.error(name, 'must not be blank (write "" to resolve no names on the proxy node)')
    return _check_template(values, name, text, RESOLVER_PLACEHOLDERS, RESOLVER_PLACEHOLDERS)
