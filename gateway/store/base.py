"""
What the control API needs of a store, whichever backend keeps it.

A store holds the bodies of the API-registered clusters (as clients sent
them) and serialises every change of the registry through L{Store.lock}: a
PUT or DELETE of this gateway's API, and -- with a shared backend -- a
change another gateway made, applied here as it arrives.  Changes never
interleave, so a body is always checked against the registry it lands in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredLock

__all__ = ["Body", "Sink", "Store", "StoreConflict", "StoreUnavailable"]

#: A cluster's body: the keys of its C{[clusters.NAME]} table, secrets inline.
Body = Mapping[str, Any]

#: Applies a change made elsewhere to this gateway (the body, or None for a
#: deletion), under the store's lock; fires with why this gateway does not
#: serve the cluster (its body is invalid here, its port is taken) or None.
Sink = Callable[[str, Body | None], Deferred[str | None]]


class StoreUnavailable(Exception):
    """The change cannot be kept now (etcd unreachable, the file unwritable): a 503, with the reason."""


class StoreConflict(Exception):
    """
    Another gateway changed the registry since this one last saw it: nothing
    was written.  Wait for L{Store.caught_up} of C{newest}, check the body
    again against what changed, and try again.
    """

    def __init__(self, newest: int) -> None:
        super().__init__(newest)
        self.newest = newest


class Store(Protocol):
    #: "file" or "etcd", for status.
    backend: str
    #: Held for each change of the registry, local or remote (see the module).
    lock: DeferredLock

    @property
    def bodies(self) -> Mapping[str, Body]:
        """The registry's bodies as this gateway last saw it."""

    def put(self, name: str, body: Body) -> Deferred[None]:
        """Keep C{body} as cluster C{name}'s; L{StoreUnavailable} or L{StoreConflict} when it cannot."""

    def delete(self, name: str) -> Deferred[None]:
        """Forget cluster C{name}; failures as for L{put}."""

    def caught_up(self, revision: int) -> Deferred[None]:
        """Fires once every change up to C{revision} is applied here."""

    def attach(self, sink: Sink) -> None:
        """Where changes made elsewhere go (a backend shared by no one never calls it)."""

    def status(self) -> dict[str, Any]:
        """The C{store} section of C{GET /v1/health}."""

    def not_ready(self) -> list[str]:
        """Why clients should not be sent here yet: the registry is not loaded (empty: ready)."""
