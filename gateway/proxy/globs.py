"""
Host name globs (the C{hostnames} of a cluster, matched by the router with
L{fnmatch.fnmatchcase}) for the PAC file: as a JavaScript test of a host,
and whether two of them share a host name.  Pure.

Browsers' C{shExpMatch} turns its pattern into a regular expression with
only C{.} escaped: it reads C{*}, C{?} and literals as fnmatch does, but not
C{[!...]} (no negation there) nor an unclosed C{[} (the expression throws).
A glob with a class or a bracket becomes a regular expression of its own.
"""

from __future__ import annotations

import functools
import json
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase
from typing import NamedTuple

__all__ = ["GlobIndex", "glob_test", "globs_overlap"]

#: The characters a host name the router matches can have (canonical, lower case).
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._")
_ASCII = [chr(code) for code in range(128)]
_STAR = None  # the glob token of "*"


def glob_test(pattern: str, variable: str) -> str:
    """A JavaScript expression: whether the string in C{variable} matches C{pattern} as fnmatch reads it."""
    tokens = _glob_tokens(pattern)
    if _shexp_safe(tokens):
        return f"shExpMatch({variable}, {json.dumps(pattern)})"
    return f"/{_js_regex(tokens)}/.test({variable})"


class _Chars(NamedTuple):
    """The characters one position of a glob matches: a set of ASCII ones, and maybe every other one."""

    ascii: frozenset[str]
    other: bool


_ANY = _Chars(frozenset(_ASCII), True)
_Token = _Chars | None  # None: "*"


def _glob_tokens(pattern: str) -> list[_Token]:
    """
    C{pattern} as fnmatch reads it.  Classes are cut out as
    L{fnmatch.translate} does and their members found by asking
    L{fnmatchcase} itself, so the script cannot disagree with the router
    about a class.  (A class between ASCII characters either matches every
    non-ASCII character, when negated, or none.)
    """
    tokens: list[_Token] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            if not tokens or tokens[-1] is not _STAR:
                tokens.append(_STAR)
            continue
        if c == "[":
            j = i + 1 if i < n and pattern[i] == "!" else i
            j += 1 if j < n and pattern[j] == "]" else 0
            j = pattern.find("]", j)
            if j >= 0:
                part = pattern[i - 1 : j + 1]
                tokens.append(
                    _Chars(frozenset(ch for ch in _ASCII if fnmatchcase(ch, part)), fnmatchcase("\u00e9", part))
                )
                i = j + 1
                continue
        tokens.append(_ANY if c == "?" else _Chars(frozenset(c), False))
    return tokens


def _shexp_safe(tokens: Sequence[_Token]) -> bool:
    """
    Whether C{shExpMatch} reads the glob as fnmatch does: only C{*}, C{?}
    and literals.  Browsers turn the pattern into a regular expression with
    only C{.} escaped, so a literal bracket (an unclosed C{[}) would throw.
    """
    return all(
        t is _STAR or t == _ANY or (len(t.ascii) == 1 and not t.other and t.ascii.isdisjoint("[]")) for t in tokens
    )


def _js_regex(tokens: Sequence[_Token]) -> str:
    """A JS regular expression (without slashes) matching exactly what the glob matches."""
    parts = ["^"]
    for token in tokens:
        if token is _STAR:
            parts.append("[^]*")
        elif token.other:
            rest = frozenset(_ASCII) - token.ascii
            parts.append("[^" + _js_class(rest) + "]" if rest else "[^]")
        elif len(token.ascii) == 1:
            parts.append(_js_char(next(iter(token.ascii))))
        elif token.ascii:
            parts.append("[" + _js_class(token.ascii) + "]")
        else:
            parts.append("(?!)")  # an empty class: nothing matches
    return "".join(parts) + "$"


def _js_char(c: str) -> str:
    return c if c.isascii() and c.isalnum() else f"\\x{ord(c):02x}"


def _js_class(chars: frozenset[str]) -> str:
    """C{chars} as the inside of a JS class, consecutive code points as ranges."""
    codes = sorted(ord(c) for c in chars)
    out, k = [], 0
    while k < len(codes):
        end = k
        while end + 1 < len(codes) and codes[end + 1] == codes[end] + 1:
            end += 1
        low, high = _js_char(chr(codes[k])), _js_char(chr(codes[end]))
        out.append(low if end == k else f"{low}-{high}")
        k = end + 1
    return "".join(out)


def globs_overlap(a: str, b: str) -> bool:
    """
    Whether some host name matches both globs: a search over pairs of
    positions (a product automaton), each C{*} matching empty or one more
    character of the other side -- unless their literal ends already
    disagree (C{*.a.internal}, C{*.b.internal}), as is usual.
    """
    x, x_ends = _host_positions(a)
    y, y_ends = _host_positions(b)
    if not all(p.startswith(q) or q.startswith(p) for p, q in zip(x_ends, y_ends, strict=True)):
        return False
    nothing: frozenset[str] = frozenset()  # past the end: no character, like an empty class
    seen: set[tuple[int, int]] = set()
    todo = [(0, 0)]
    while todo:
        i, j = todo.pop()
        if (i, j) in seen:
            continue
        seen.add((i, j))
        if i == len(x) and j == len(y):
            return True
        s = x[i] if i < len(x) else nothing
        t = y[j] if j < len(y) else nothing
        if s is _STAR:
            todo.append((i + 1, j))
            if t:  # a set with a character in it (None, the other star, is falsy)
                todo.append((i, j + 1))
        if t is _STAR:
            todo.append((i, j + 1))
            if s:
                todo.append((i + 1, j))
        if s and t and s & t:
            todo.append((i + 1, j + 1))
    return False


class GlobIndex:
    """
    Which of many globs share a host name with a given one, without
    comparing every pair: two globs can only overlap where one's literal
    suffix ends the other's (L{globs_overlap} checks that first), so the
    suffixes, reversed and sorted, give the candidates in a lookup per
    suffix length and a range -- thousands of cluster patterns, each under
    a suffix of its own, cost milliseconds, not seconds.
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        #: reversed literal suffix -> the patterns that end in it
        self._by_suffix: dict[str, list[str]] = {}
        for pattern in dict.fromkeys(patterns):
            self._by_suffix.setdefault(_host_positions(pattern)[1][1], []).append(pattern)
        self._suffixes = sorted(self._by_suffix)

    def overlapping(self, pattern: str) -> list[str]:
        """The indexed globs that some host name matches together with C{pattern}."""
        suffix = _host_positions(pattern)[1][1]
        shorter = (suffix[:n] for n in range(len(suffix)))  # suffixes that C{pattern}'s ends in
        start = bisect_left(self._suffixes, suffix)
        end = bisect_left(self._suffixes, suffix + "\U0010ffff", start)  # those that end in C{pattern}'s
        candidates = [s for s in shorter if s in self._by_suffix] + self._suffixes[start:end]
        return [other for s in candidates for other in self._by_suffix[s] if globs_overlap(pattern, other)]


@functools.lru_cache(maxsize=4096)
def _host_positions(pattern: str) -> tuple[tuple[frozenset[str] | None, ...], tuple[str, str]]:
    """
    The glob's positions as the host name characters each matches (None:
    C{*}), and its literal prefix and (reversed) suffix.
    """
    positions = tuple(None if t is _STAR else t.ascii & _HOST_CHARS for t in _glob_tokens(pattern))

    def literal(run: Iterable[frozenset[str] | None]) -> str:
        chars: list[str] = []
        for position in run:
            if position is None or len(position) != 1:
                break
            chars += position
        return "".join(chars)

    return positions, (literal(positions), literal(reversed(positions)))
