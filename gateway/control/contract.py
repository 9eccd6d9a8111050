"""
The contract between the control API (L{gateway.control.http}) and the running
gateway: what a client of C{/v1/clusters} can ask for, as plain data.

The API knows nothing of services or SSH; the gateway knows nothing of HTTP.
Both sides share these types, so each can be tested against a stand-in for
the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred


@dataclass(frozen=True)
class ClusterView:
    """
    One cluster as the API shows it.

    C{settings} never contains the private key, its passphrase or the token;
    it says whether a token is set and which key (type and SHA256 fingerprint)
    is used instead.  C{status} holds: C{state}, C{proxy} (or None),
    C{connected_since} (ISO 8601 or None), C{open_streams},
    C{streams_opened}, C{streams_failed} (reason -> count), C{bytes_up},
    C{bytes_down}, C{last_error}, C{proxies} (per candidate: C{proxy},
    C{last_failure}: None or C{kind}, C{error}, C{at}, C{next_attempt_in}).
    """

    name: str
    source: str  # "config" (TOML file) or "api"
    settings: Mapping[str, Any] = field(default_factory=dict)
    status: Mapping[str, Any] = field(default_factory=dict)


class ControlError(Exception):
    """
    A request the gateway refuses: C{status} is the HTTP status to answer
    (400 invalid, 404 unknown cluster, 409 conflict), C{field} the offending
    body key (dotted, as in config errors) when there is one.
    """

    def __init__(self, status: int, reason: str, field: str | None = None) -> None:
        super().__init__(status, reason, field)
        self.status = status
        self.reason = reason
        self.field = field


class ClusterControl(Protocol):
    """What the control API needs from the gateway."""

    def list_clusters(self) -> list[ClusterView]: ...

    def get_cluster(self, name: str) -> ClusterView:
        """Raise ControlError(404) for an unknown cluster."""

    def put_cluster(self, name: str, body: Mapping[str, Any]) -> Deferred[bool]:
        """
        Create or replace cluster C{name} from C{body} (the keys of a
        C{[clusters.NAME]} TOML table, C{key} as PEM text; file paths,
        C{proxy_command} and C{jump} to a cluster only as C{[gateway]}
        allows).  Fires with True when created, False when replaced; fails
        with ControlError (400 with field, 409 for a TOML-defined cluster).
        """

    def delete_cluster(self, name: str) -> Deferred[None]:
        """Stop routing to it, close its connections, forget it (404, 409)."""

    def health(self) -> Mapping[str, Any]:
        """
        C{{"status": "ok" or "not-ready", "gateway": NAME, "live": true,
        "ready": BOOL, "not_ready": [REASON...], "listeners": {"socks": [...],
        "http": [...]}, "store": {...}, "clusters": {"up": N, "down": M}}}.
        """

    def metrics(self) -> bytes:
        """The Prometheus text exposition of the gateway's metrics."""

    def proxy_pac(self, host: str | None, cluster: str | None) -> bytes | None:
        """
        The PAC file (L{gateway.proxy.pac.PacSource.pac_file}: C{host} from
        the C{Host} header, C{cluster} the C{?cluster=} view); None when the
        gateway serves none or the cluster is unknown (404).
        """
