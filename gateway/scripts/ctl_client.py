"""
C{gateway-ctl}'s HTTP client of the control API, on C{urllib} alone: the
environment's HTTP proxy settings are ignored (the bearer token goes straight
to the gateway), as are redirects, and every failure becomes one L{CtlError}
line with its exit status.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from gateway.scripts.ctl_errors import EXIT_REFUSED, EXIT_UNREACHABLE, CtlError, one_line

#: C{refused(status, reason, field)}: the message for a refusal a command
#: expects (a 404 for a name), or None for the generic one.
Refusal = Callable[[int, str, str | None], str | None]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Do not follow redirects: the Authorization header would go along."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Client:
    """The control API at C{url}, spoken to with C{token}."""

    def __init__(self, url: str, token: str | None, timeout: float) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        refused: Refusal | None = None,
    ) -> tuple[int, Any]:
        """
        Send the request; return (status, parsed JSON or None) for a 2xx
        answer, else raise L{CtlError} with the message C{refused(status,
        reason, field)} gives (or a generic one).
        """
        request = urllib.request.Request(self.url + path, data=body, method=method)
        request.add_header("Accept", "application/json")
        if body is not None:
            request.add_header("Content-Type", "application/json")
        if self.token is not None:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as e:
            status = e.code
            try:
                raw = e.read()
            except (OSError, http.client.HTTPException):
                raw = b""
            finally:
                e.close()
            raise self._refusal(status, e.reason, raw, refused) from None
        except urllib.error.URLError as e:
            raise self._unreachable(e.reason) from None
        except (OSError, http.client.HTTPException) as e:
            raise self._unreachable(e) from None
        if not raw.strip():
            return status, None
        try:
            return status, json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CtlError(
                f"unexpected answer from {self.url}{path}: HTTP {status} with a body that is not JSON", EXIT_REFUSED
            ) from None

    def _unreachable(self, reason: object) -> CtlError:
        if isinstance(reason, TimeoutError):
            text = f"no answer within {self.timeout:g} s"
        elif isinstance(reason, http.client.RemoteDisconnected):
            text = "the connection closed without an answer"
        elif isinstance(reason, OSError) and reason.strerror:
            text = reason.strerror
        else:
            text = str(reason) or type(reason).__name__
        return CtlError(f"cannot reach the gateway control API at {self.url}: {one_line(text)}", EXIT_UNREACHABLE)

    def _refusal(
        self,
        status: int,
        http_reason: object,
        raw: bytes,
        refused: Refusal | None,
    ) -> CtlError:
        reason, field = "", None
        try:
            answer = json.loads(raw) if raw.strip() else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            answer = None
        if isinstance(answer, dict):
            reason = one_line(answer.get("error") or "")
            field = one_line(answer["field"]) if answer.get("field") else None
        if status == 401:
            if self.token is None:
                return CtlError("authentication failed: give --token or GATEWAY_CONTROL_TOKEN", EXIT_REFUSED)
            return CtlError(
                "authentication failed: the gateway refused the token (check --token or GATEWAY_CONTROL_TOKEN)",
                EXIT_REFUSED,
            )
        message = refused(status, reason, field) if refused is not None else None
        if not message:
            detail = reason or one_line(http_reason) or "no reason given"
            if field:
                detail = f"{field}: {detail}"
            if 300 <= status < 400:
                detail = f"redirected ({detail}); is --url the gateway control API?"
            message = f"the gateway refused the request (HTTP {status}): {detail}"
        return CtlError(message, EXIT_REFUSED)
