"""
A small etcd v3 client over etcd's HTTP/JSON gateway, with C{treq}.

Why not a client library: the maintained Python etcd3 clients speak gRPC
from threads or asyncio, and gRPC's own event loop does not run inside
Twisted's reactor; the JSON gateway is part of every etcd server since 3.4
(C{/v3/...} paths), needs nothing but HTTP, and the store needs four calls
of it: range, txn, watch and authenticate.  The messages are built and read
in L{gateway.store.etcd.wire}, without I/O.

Endpoints are tried in turn: a call goes to the member that answered last,
and moves on to the next member when that one refuses the connection, does
not answer within C{timeout} seconds, answers that it has no leader or is
unavailable, or answers what etcd does not (another server on its port, a
proxy's error page).  Only when every member failed does the call fail, with
L{EtcdUnavailable} naming the last reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import treq
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL, crypto
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, ConnectionClosed, DNSLookupError, TimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.ssl import Certificate, KeyPair, PrivateCertificate, optionsForClientTLS
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
    _HTTP11ClientFactory,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS, IResponse
from zope.interface import implementer

from gateway.config.secrets import SecretFileError, read_secret_file
from gateway.store.etcd import wire
from gateway.store.etcd.wire import EtcdProtocolError, KeyValue, WatchDecoder, WatchResponse

__all__ = ["Etcd", "EtcdClient", "EtcdError", "EtcdUnavailable", "TlsFiles", "Watch"]

#: Messages of answers that mean "ask another member" (etcd's rpctypes).
_RETRY_ELSEWHERE = (
    "no leader",
    "leader changed",
    "request timed out",
    "not capable",
    "unavailable",
    "too many requests",
)
#: The answer to a token that expired or was revoked: authenticate again, once.
_BAD_TOKEN = ("invalid auth token", "user name is empty", "revision of auth store is old")
_T = TypeVar("_T")


class EtcdUnavailable(Exception):
    """No member of the cluster answered: the reason is the last member's."""


class EtcdError(Exception):
    """A member answered and refused the call (permission denied, a bad request): not worth retrying."""


@dataclass(frozen=True)
class TlsFiles:
    """C{[store]}'s TLS files: the CA that signs the members' certificates, and the client certificate."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


class Watch(Protocol):
    """A running watch: C{ended} fires with why it ended (never fails); L{cancel} ends it."""

    ended: Deferred[str]

    def cancel(self) -> None: ...


class Etcd(Protocol):
    """The calls the store makes; L{EtcdClient} over HTTP, L{gateway.testing.etcd.MemoryEtcd} in memory."""

    @property
    def endpoint(self) -> str: ...

    def range(self, prefix: bytes) -> Deferred[tuple[int, list[KeyValue]]]:
        """C{(revision, every key-value under prefix)}."""

    def newest(self, prefix: bytes) -> Deferred[int]:
        """The C{mod_revision} of the key under C{prefix} modified last (0: none); needs a quorum."""

    def txn(
        self, prefix: bytes, seen: int, puts: Mapping[bytes, bytes], deletes: Sequence[bytes]
    ) -> Deferred[tuple[bool, int]]:
        """See L{wire.txn_request} and L{wire.txn_outcome}."""

    def watch(self, prefix: bytes, start_revision: int, receive: Callable[[WatchResponse], None]) -> Deferred[Watch]:
        """Start watching; fires once the stream is open."""

    def get(self, key: bytes) -> Deferred[KeyValue | None]:
        """The key's value, or None."""

    def put(self, key: bytes, value: bytes, lease: int = 0) -> Deferred[int]:
        """Write C{key} (bound to C{lease}, 0: none), unconditionally: the revision of the write."""

    def grant(self, ttl: int) -> Deferred[int]:
        """A new lease of C{ttl} seconds: its id."""

    def keepalive(self, lease: int) -> Deferred[int]:
        """Renew C{lease}: the seconds it has left, 0 when it expired."""

    def revoke(self, lease: int) -> Deferred[None]:
        """End C{lease} now (its keys go); one etcd no longer knows is no error."""

    def close(self) -> Deferred[None]:
        """Close the connections kept for the next call: the gateway stops, after its last call."""


class _Stream(TwistedProtocol):
    """A watch's response body: messages to C{receive}, the end to C{ended}."""

    def __init__(self, receive: Callable[[WatchResponse], None], bad_token: Callable[[], None]) -> None:
        self._receive = receive
        self._bad_token = bad_token
        self._decoder = WatchDecoder()
        self.ended: Deferred[str] = Deferred()
        self._reason: str | None = None

    def dataReceived(self, data: bytes) -> None:
        try:
            messages = self._decoder.feed(data)
        except EtcdProtocolError as e:
            if self._reason is None:
                self._receive(WatchResponse(revision=0, canceled=True, reason=str(e), unreadable=True))
            self._end(f"bad watch message: {e}")
            return
        for message in messages:
            if message.canceled and "unauthenticated" in message.reason.lower():
                # etcd answers a watch's bad token with 200 and a cancelled
                # watch, not with a 401: ask for a new token next time.
                self._bad_token()
            if self._reason is None:
                self._receive(message)

    def _end(self, reason: str) -> None:
        if self._reason is None:
            self._reason = reason
            if self.transport is not None:
                self.transport.stopProducing()  # type: ignore[attr-defined]  # a response body's producer

    def cancel(self) -> None:
        self._end("cancelled")

    def connectionLost(self, reason: Failure = Failure(ConnectionClosed())) -> None:  # noqa: B008
        if not self.ended.called:
            if self._reason is None:
                self._reason = "etcd ended the stream" if reason.check(ResponseDone) else "the connection was lost"
            self.ended.callback(self._reason)


def _read(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(key, f"cannot read {path!r}: {e.strerror or type(e).__name__}") from None


def tls_policy(files: TlsFiles) -> Any:
    """
    An C{IPolicyForHTTPS} checking members against C{ca_file} (else the
    system's CAs), presenting the client certificate when there is one.

    @raise ValueError: C{(key, reason)} for a file that cannot be used.
    """
    trust = None
    if files.ca_file:
        try:
            trust = Certificate.loadPEM(_read(files.ca_file, "store.ca_file"))
        except ValueError:
            raise
        except Exception:  # pyOpenSSL's errors
            raise ValueError("store.ca_file", f"{files.ca_file!r} holds no PEM certificate") from None
    client = None
    if files.cert_file and files.key_file:
        try:
            key = read_secret_file(files.key_file, "key file")
        except SecretFileError as e:
            raise ValueError("store.key_file", str(e)) from None
        try:
            private = load_pem_private_key(key, password=None)
        except TypeError:  # encrypted: OpenSSL's own loading would ask for the passphrase on the terminal
            raise ValueError("store.key_file", "is encrypted: the gateway reads it unencrypted (0600)") from None
        except Exception:
            raise ValueError("store.key_file", "holds no PEM private key") from None
        try:
            pair = KeyPair(crypto.PKey.from_cryptography_key(private))  # type: ignore[arg-type]  # others: TypeError
            client = PrivateCertificate.load(_read(files.cert_file, "store.cert_file"), pair, crypto.FILETYPE_PEM)
        except ValueError:
            raise
        except Exception:
            raise ValueError("store.cert_file", "not a PEM certificate matching store.key_file's key") from None

    @implementer(IPolicyForHTTPS)
    class Policy:
        def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
            return optionsForClientTLS(hostname.decode("ascii"), trustRoot=trust, clientCertificate=client)

    return Policy()


class EtcdClient:
    """
    L{Etcd} over the JSON gateway of C{endpoints} (C{http://HOST:PORT} or
    C{https://...}).

    @param tls: an C{IPolicyForHTTPS} for https endpoints (L{tls_policy}).
    @param password: with C{user}, etcd's authentication: a token is asked
        for at the first call and again when etcd says it expired.
    """

    def __init__(
        self,
        reactor: Any,
        endpoints: Sequence[str],
        *,
        timeout: float,
        tls: Any = None,
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoint")
        self._clock: IReactorTime = reactor
        self._endpoints = [e.rstrip("/") for e in endpoints]
        self._current = 0
        self._timeout = timeout
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 4
        # The pool builds its connections from this (private) attribute: without it each new
        # connection to etcd logs "Starting factory". Pinned by tests/test_conch_pins.py.
        pool._factory = _QuietFactory
        self._pool = pool
        agent = Agent(reactor, tls, pool=pool) if tls is not None else Agent(reactor, pool=pool)
        self._http = treq.client.HTTPClient(agent)
        self._user = user
        self._password = password
        self._token: str | None = None

    @property
    def endpoint(self) -> str:
        return self._endpoints[self._current]

    def close(self) -> Deferred[None]:
        return self._pool.closeCachedConnections()

    # --- calls --------------------------------------------------------------------------

    def range(self, prefix: bytes) -> Deferred[tuple[int, list[KeyValue]]]:
        def read(answer: Mapping[str, Any]) -> tuple[int, list[KeyValue]]:
            return wire.revision_of(answer, required=True), wire.range_kvs(answer)

        return self._call("/v3/kv/range", wire.range_request(prefix), read)

    def newest(self, prefix: bytes) -> Deferred[int]:
        def read(answer: Mapping[str, Any]) -> int:
            return max((kv.mod_revision for kv in wire.range_kvs(answer)), default=0)

        return self._call("/v3/kv/range", wire.range_request(prefix, newest_only=True), read)

    def txn(
        self, prefix: bytes, seen: int, puts: Mapping[bytes, bytes], deletes: Sequence[bytes]
    ) -> Deferred[tuple[bool, int]]:
        request = wire.txn_request(prefix, seen, puts, deletes)
        return self._call("/v3/kv/txn", request, wire.txn_outcome)

    def watch(self, prefix: bytes, start_revision: int, receive: Callable[[WatchResponse], None]) -> Deferred[Watch]:
        return Deferred.fromCoroutine(self._watch(wire.watch_request(prefix, start_revision), receive))

    def get(self, key: bytes) -> Deferred[KeyValue | None]:
        def read(answer: Mapping[str, Any]) -> KeyValue | None:
            return next(iter(wire.range_kvs(answer)), None)

        return self._call("/v3/kv/range", {"key": wire.b64(key)}, read)

    def put(self, key: bytes, value: bytes, lease: int = 0) -> Deferred[int]:
        def read(answer: Mapping[str, Any]) -> int:
            return wire.revision_of(answer, required=True)

        return self._call("/v3/kv/put", wire.put_request(key, value, lease), read)

    def grant(self, ttl: int) -> Deferred[int]:
        return self._call("/v3/lease/grant", {"TTL": str(ttl)}, wire.lease_granted)

    def keepalive(self, lease: int) -> Deferred[int]:
        return self._call("/v3/lease/keepalive", {"ID": str(lease)}, wire.lease_kept)

    def revoke(self, lease: int) -> Deferred[None]:
        def gone(failure: Failure) -> None:
            failure.trap(EtcdError)
            if "lease not found" not in str(failure.value):
                failure.raiseException()

        return self._call("/v3/lease/revoke", {"ID": str(lease)}, lambda _: None).addErrback(gone)

    # --- the transport ------------------------------------------------------------------

    def _members(self) -> Iterator[str]:
        """
        Each member once, from the one that answered last: the caller's loop
        body runs for one, and leaving the loop (it answered) keeps it current.
        """
        for _ in range(len(self._endpoints)):
            yield self.endpoint
            self._current = (self._current + 1) % len(self._endpoints)

    def _forget_token(self) -> None:
        self._token = None

    def _call(self, path: str, body: Mapping[str, Any], read: Callable[[Mapping[str, Any]], _T]) -> Deferred[_T]:
        """C{path}'s answer, as C{read} reads it: one it cannot read is asked of the next member."""
        return Deferred.fromCoroutine(self._try_members(path, body, read))

    async def _try_members(self, path: str, body: Mapping[str, Any], read: Callable[[Mapping[str, Any]], _T]) -> _T:
        last = "no member tried"
        for endpoint in self._members():
            try:
                status, data = await self._exchange(endpoint, path, body)
                if status == 401 or (status != 200 and _says(data, _BAD_TOKEN)):
                    self._token = None
                    status, data = await self._timed(self._post(endpoint, path, body))
            except _Unreachable as e:
                last = f"{endpoint}: {e}"
            else:
                if status == 200:
                    try:
                        return read(wire.decode_answer(data))
                    except EtcdProtocolError as e:
                        last = f"{endpoint}: {e}"
                elif wire.is_error_answer(data) and not _says(data, _RETRY_ELSEWHERE):
                    raise EtcdError(f"{endpoint}: {wire.error_message(data)}")
                else:
                    last = f"{endpoint}: {wire.error_message(data)}"
        raise EtcdUnavailable(last)

    async def _exchange(self, endpoint: str, path: str, body: Mapping[str, Any]) -> tuple[int, bytes]:
        """
        One call to C{endpoint}, twice when the first went out on a kept
        connection that was closed under it.  Safe for every call the store
        makes: reads and lease renewals are idempotent, and a transaction
        that did commit the first time fails its compare the second time.
        """
        try:
            return await self._timed(self._post(endpoint, path, body))
        except _Unreachable as e:
            if not e.stale:
                raise
        result: tuple[int, bytes] = await self._timed(self._post(endpoint, path, body))
        return result

    async def _post(self, endpoint: str, path: str, body: Mapping[str, Any]) -> tuple[int, bytes]:
        response = await self._request(endpoint, path, body)
        return response.code, await _content(response)

    async def _request(self, endpoint: str, path: str, body: Mapping[str, Any], watch: bool = False) -> IResponse:
        headers = Headers({b"content-type": [b"application/json"]})
        if watch:
            # gRPC metadata "hasleader": a member cut off from the quorum
            # ends the watch instead of going silent (what etcdctl asks too).
            headers.addRawHeader(b"grpc-metadata-hasleader", b"true")
        if self._user is not None:
            if self._token is None:
                self._token = await self._authenticate(endpoint)
            headers.addRawHeader(b"authorization", self._token.encode("ascii"))
        try:
            response: IResponse = await self._http.post(
                endpoint + path, data=json.dumps(body).encode(), headers=headers
            )
        except _UNREACHABLE as e:
            raise _Unreachable(_why(e), stale=isinstance(e, _STALE)) from None
        return response

    async def _authenticate(self, endpoint: str) -> str:
        body = json.dumps({"name": self._user, "password": self._password}).encode()
        try:
            response = await self._http.post(endpoint + "/v3/auth/authenticate", data=body)
            data = await treq.content(response)
        except _UNREACHABLE as e:
            raise _Unreachable(_why(e)) from None
        if response.code != 200 and wire.is_error_answer(data):
            # The reason etcd gives ("authentication failed, invalid user ID
            # or password") names neither; the password is never in it.
            raise EtcdError(f"{endpoint}: cannot authenticate as {self._user!r}: {wire.error_message(data)}")
        try:
            token = wire.decode_answer(data).get("token") if response.code == 200 else None
        except EtcdProtocolError:
            token = None
        if not isinstance(token, str) or not token.isascii():
            raise _Unreachable("authenticate: an answer that is not etcd's")  # the next member may be
        return token

    async def _timed(self, call: Any) -> Any:
        """C{call} (a coroutine), given up after C{timeout} seconds as unreachable."""
        d = Deferred.fromCoroutine(call)
        timer: IDelayedCall = self._clock.callLater(self._timeout, d.cancel)
        try:
            return await d
        except Exception:
            if timer.active():
                raise  # the call failed by itself
            # Whatever the cancelled call raised (a request given up looks like a
            # closed kept connection, which is worth once more: this one is not).
            raise _Unreachable(f"no answer within {self._timeout:g} s") from None
        finally:
            if timer.active():
                timer.cancel()

    async def _watch(self, request: Mapping[str, Any], receive: Callable[[WatchResponse], None]) -> Watch:
        last = "no member tried"
        for endpoint in self._members():
            try:
                response = await self._timed(self._request(endpoint, "/v3/watch", request, watch=True))
                if response.code == 200:
                    stream = _Stream(receive, self._forget_token)
                    response.deliverBody(stream)
                    return stream
                data = await _content(response)
            except _Unreachable as e:
                last = f"{endpoint}: {e}"
            else:
                last = f"{endpoint}: {wire.error_message(data)}"
                if response.code == 401:
                    self._token = None
        raise EtcdUnavailable(last)


#: What a member that cannot be reached (or talked to: TLS) raises.  A POST on a pooled
#: connection the member has closed fails with RequestGenerationFailed or
#: RequestTransmissionFailed (the pool retries only idempotent methods); a host name in
#: endpoints that does not resolve, with DNSLookupError.
_UNREACHABLE = (
    ConnectError,
    DNSLookupError,
    ResponseFailed,
    ResponseNeverReceived,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    TimeoutError,
)


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False


class _Unreachable(Exception):
    """This member did not answer (refused, reset, timed out): try the next one."""

    def __init__(self, reason: str, stale: bool = False) -> None:
        super().__init__(reason)
        #: The request may have gone out on a kept connection the member had
        #: closed meanwhile (a restart): worth once more on a new one.
        self.stale = stale


#: Failures of a request on a connection that was closed under it.
_STALE = (ResponseNeverReceived, RequestGenerationFailed, RequestTransmissionFailed)


async def _content(response: IResponse) -> bytes:
    """The body of C{response}; L{_Unreachable} when the connection breaks off mid-answer."""
    try:
        return await treq.content(response)
    except _UNREACHABLE as e:
        raise _Unreachable(_why(e)) from None


def _why(error: Exception) -> str:
    if isinstance(error, (ResponseFailed, RequestGenerationFailed, RequestTransmissionFailed)):
        for reason in error.reasons:
            if reason.check(SSL.Error):
                return f"TLS failed ({_tls_reason(reason.value)})"
        if isinstance(error, ResponseNeverReceived):
            return "the connection closed before an answer"
        if isinstance(error, (RequestGenerationFailed, RequestTransmissionFailed)):
            return "the connection failed while the request was sent"
        return "the connection failed mid-answer"
    return str(error.__class__.__doc__ or type(error).__name__).strip().rstrip(".")


def _tls_reason(error: BaseException) -> str:
    """OpenSSL's reason ("certificate verify failed"), without the library's tuple noise."""
    for args in getattr(error, "args", [[]])[0] or []:
        if isinstance(args, tuple) and args and isinstance(args[-1], str):
            return args[-1]
    return "handshake error"


def _says(data: bytes, phrases: Sequence[str]) -> bool:
    message = wire.error_message(data).lower()
    return any(phrase in message for phrase in phrases)
