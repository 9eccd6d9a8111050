"""
Requests addressed to the HTTP proxy listener itself: origin-form
C{GET /proxy.pac} and C{GET /proxy.pac?cluster=NAME} (and C{HEAD}), the PAC
file a browser is pointed at (L{gateway.proxy.pac}).  The adapter
(L{gateway.proxy.http.protocol}) hands such a head here and writes the answer.

Browsers fetch a PAC file without a proxy and without credentials, and
Chromium takes only a C{200} (any other status fails the fetch): so no
credentials are asked, and every refusal is a plain 4xx.  Only the C{200}
keeps the connection, like a forwarded answer; the refusals close it, like
the proxy's other errors, without reading a body.  C{Cache-Control:
no-cache}: the file changes with the clusters, and a browser that keeps a
copy must ask again (Chromium keeps none).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from twisted.logger import Logger

from gateway.proxy.http.events import RequestHead
from gateway.proxy.http.framing import _content_length, _head_bytes, _single, _values
from gateway.proxy.http.machine import error_response
from gateway.proxy.pac import PAC_CONTENT_TYPE, PacRefused, PacSource, fetch_pac

log = Logger()

_METHODS = ("GET", "HEAD")
_VIEW = re.compile(r"cluster=[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class LocalAnswer:
    """A complete response; C{keep_alive} false: the connection closes after it."""

    data: bytes
    keep_alive: bool


def answer_local(
    head: RequestHead, pac: PacSource | None, keep_alive: bool, client: str, cluster: str | None = None
) -> LocalAnswer:
    """
    The answer to C{head}, a request for the PAC file; C{keep_alive} is what
    the client connection may do after a C{200}.  On the listener of
    C{cluster}, the file is that cluster's view unless the query names
    another.  Logged, once.
    """
    status, detail, body = _pac_file(head, pac, cluster)
    query = head.target.partition("?")[2]
    log.info(
        "PAC file{view} for {client}: {status}{detail}",
        # Not the query as sent: request lines are not logged (URLs carry tokens).
        view=f" ({query})" if _VIEW.fullmatch(query) else " (other query)" if query else "",
        client=client,
        cluster=cluster,  # the listener's (None: a shared listener)
        status=status,
        detail=f" ({detail})" if detail else "",
        outcome="pac" if status == 200 else "pac-refused",
    )
    if body is None:
        allow = ", ".join(_METHODS) if status == 405 else None
        return LocalAnswer(error_response(status, detail, version=head.version, allow=allow), keep_alive=False)
    lines = [
        f"{head.version} 200 OK",
        f"Content-Type: {PAC_CONTENT_TYPE.decode('ascii')}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-cache",
        "Connection: keep-alive" if keep_alive else "Connection: close",
    ]
    return LocalAnswer(_head_bytes(lines) + (b"" if head.method == "HEAD" else body), keep_alive)


def _pac_file(head: RequestHead, pac: PacSource | None, cluster: str | None) -> tuple[int, str, bytes | None]:
    """(status, detail for the client and the log, the PAC file or None)."""
    if head.method not in _METHODS:
        return 405, f"the PAC file is read with {' or '.join(_METHODS)}", None
    if _values(head.headers, "transfer-encoding") or _content_length(head.headers):  # checked by the parser
        return 400, "a request for the PAC file has no body", None
    try:
        pac_file = pac.pac_file if pac is not None else None
        body = fetch_pac(pac_file, head.target.partition("?")[2], _single(head.headers, "host"), cluster)
        return 200, "", body
    except PacRefused as e:
        return e.status, e.reason, None
    except Exception:
        log.failure("PAC file: unexpected error")
        return 500, "internal error", None
