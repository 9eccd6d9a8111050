"""
The default backend: the clusters in one 0600 JSON file of this host
(L{gateway.store.statefile.StateFile}), read at start-up, rewritten whole
at each change.  Nobody else writes it, so there is never a conflict nor a
change to wait for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock, fail, succeed

from gateway.store.base import Body, Sink, StoreUnavailable
from gateway.store.statefile import StateFile, StoreError

__all__ = ["FileStore"]


class FileStore:
    """L{gateway.store.base.Store} over C{state_file}, starting from the C{bodies} it held."""

    backend = "file"

    def __init__(self, state_file: StateFile, bodies: Mapping[str, Body]) -> None:
        self.file = state_file
        self.lock = DeferredLock()
        self.bodies: dict[str, Body] = dict(bodies)

    def _keep(self, bodies: dict[str, Body]) -> Deferred[None]:
        try:
            self.file.save(bodies)
        except StoreError as e:
            return fail(StoreUnavailable(str(e)))
        self.bodies = bodies
        return succeed(None)

    def put(self, name: str, body: Body) -> Deferred[None]:
        return self._keep({**self.bodies, name: dict(body)})

    def delete(self, name: str) -> Deferred[None]:
        return self._keep({k: v for k, v in self.bodies.items() if k != name})

    def caught_up(self, revision: int) -> Deferred[None]:
        return succeed(None)

    def attach(self, sink: Sink) -> None:
        """Nobody else changes the file: nothing to apply, ever."""

    def status(self) -> dict[str, Any]:
        return {"backend": "file", "path": self.file.path, "state": "synced", "synced": True}

    def not_ready(self) -> list[str]:
        return []
