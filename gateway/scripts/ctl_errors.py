"""
C{gateway-ctl}'s exit statuses and its one failure type, shared by the
command line (L{gateway.scripts.ctl}), the HTTP client and the file loader.
Standard library only, like the rest of C{gateway-ctl}.
"""

from __future__ import annotations

EXIT_OK = 0
#: The gateway answered but refused (400, 401, 404, 409, 5xx, ...).
EXIT_REFUSED = 1
#: Bad command line, or a local file that cannot be read or parsed.
EXIT_USAGE = 2
#: Nothing (or no HTTP) answered at the URL.
EXIT_UNREACHABLE = 3


class CtlError(Exception):
    """A failure to report on one line, with the exit status to return."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def one_line(text: object) -> str:
    """C{text} with its white space runs (newlines too) made one space: every failure is one line."""
    return " ".join(str(text).split())
