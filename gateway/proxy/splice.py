"""
Pumping bytes between a client connection and a tunnel, once the proxy
handshake is over.

The channel is registered as the client transport's streaming producer, so a
client that reads slowly pauses the channel (which then stops granting SSH
window); a full SSH window pauses the client transport in turn.  EOF travels
both ways on its own (half-close), and the client connection ends when the
channel does: closed after an EOF, reset when the channel was cut.
"""

from __future__ import annotations

from twisted.internet.interfaces import IConsumer, IPushProducer, ITCPTransport

from gateway import sockets
from gateway.ssh.channel import TunnelChannel


class IClientTransport(ITCPTransport, IConsumer, IPushProducer):
    """
    A listener's client connection as the splice and the frontends use it: a
    TCP (or TLS over TCP) transport that can be reset, half-closed, paused
    and given the channel as its streaming producer.

    Twisted's TCP and TLS transports provide each of these interfaces but
    declare none that unites them, so this one names the combination for the
    type checker; nothing checks it at run time.
    """


class Splice:
    """Joins a client transport and a L{TunnelChannel} in both directions."""

    __slots__ = ("_transport", "channel", "_client_done", "_tunnel_done")  # one per open stream

    def __init__(self, transport: IClientTransport, channel: TunnelChannel) -> None:
        self._transport = transport
        self.channel = channel
        self._client_done = False
        self._tunnel_done = False
        channel.attach(self)
        transport.registerProducer(channel, True)

    # client -> destination

    def client_data(self, data: bytes) -> None:
        sockets.grow_reads(self._transport, len(data))
        self.channel.send(data)

    def client_eof(self) -> None:
        self._client_done = True
        self.channel.send_eof()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        # Both directions have ended: nothing more can flow, so close now
        # rather than wait for the peer to notice (TCP keeps a half-closed
        # socket open until someone closes it).
        if self._client_done and self._tunnel_done:
            self.channel.close()
            self._transport.loseConnection()

    def client_lost(self) -> None:
        # The transport is gone: whatever the channel still delivers (the
        # destination's reply and EOF may be in flight) must not reach it.
        # A half-close or write on a disconnected transport raises, and
        # that would escape into the shared SSH connection.
        self.channel.attach(None)
        if self._client_done:
            self.channel.close()
        else:
            # The client vanished without EOF: what it sent but the
            # destination has not taken yet would only hold the stream open.
            self.channel.abort()

    # destination -> client (TunnelPeer)

    def tunnel_data(self, data: bytes) -> None:
        sockets.write(self._transport, data)

    def tunnel_eof(self) -> None:
        self._tunnel_done = True
        # Nothing more will come from the channel, so it stops being the
        # transport's producer.  This matters: a transport whose producer is
        # paused when its buffer drains resumes the producer instead of
        # performing a pending half-close, and the client would never see EOF.
        self._transport.unregisterProducer()
        sockets.half_close(self._transport)
        self._maybe_finish()

    def tunnel_closed(self) -> None:
        self._transport.unregisterProducer()
        if self._tunnel_done:
            self._transport.loseConnection()
        else:
            # Closed without EOF: the SSH connection died (dead proxy node,
            # drain time-out).  Reset the client rather than close it
            # politely, so it cannot mistake a cut stream for a complete one.
            self._transport.abortConnection()

    def tunnel_pause_writing(self) -> None:
        self._transport.pauseProducing()

    def tunnel_resume_writing(self) -> None:
        self._transport.resumeProducing()
