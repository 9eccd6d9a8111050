"""
Incoming SSH packets, sans I/O: L{PacketReader} takes bytes as they arrive
and gives whole packets, opened under whichever ciphers are current -- AEAD
(AES-GCM, chacha20-poly1305), encrypt-then-MAC, or encrypt-and-MAC -- each
authenticated before its payload is used.  The sealing side, and the
ciphers themselves, are in L{gateway.ssh.packets}.
"""

from __future__ import annotations

from twisted.conch.ssh import transport

from gateway.ssh.packets import (
    _LENGTH,
    _LENGTH_PADDING,
    _TAG_SIZE,
    MAX_PACKET_LENGTH,
    AESGCMPacketCipher,
    ChaCha20Poly1305PacketCipher,
    PacketError,
)

__all__ = ["PacketReader"]


class PacketReader:
    """
    Incoming SSH packets from a byte stream.

    C{feed} appends to a C{bytearray}; C{read} takes the next whole packet
    from a read offset, under whichever C{SSHCiphers} are current for that
    packet; C{compact} drops what was read (once per batch, not per packet).
    No memoryview of the buffer outlives a C{read} call, so C{feed} may be
    called at any time between them.
    """

    __slots__ = ("buffer", "_pos", "_length", "_first")

    def __init__(self, data: bytes = b"") -> None:
        self.buffer = bytearray(data)
        self._pos = 0
        #: Length field of the packet being received, once known (else -1).
        self._length = -1
        #: Its decrypted first block (classic ciphers).
        self._first: bytes | None = None

    def __len__(self) -> int:
        return len(self.buffer) - self._pos

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def compact(self) -> None:
        if self._pos:
            del self.buffer[: self._pos]
            self._pos = 0

    def read(self, ciphers: transport.SSHCiphers, seqnr: int) -> tuple[bytes, int, int] | None:
        """
        The next packet, as C{(plaintext, start, end)}: its message type is
        C{plaintext[start]} and the payload C{plaintext[start + 1:end]}.  None
        until all of it has arrived.  Raises L{PacketError} if it is malformed
        or does not authenticate.
        """
        aead = getattr(ciphers, "in_aead", None)
        if aead is not None:
            return self._read_aead(aead, seqnr)
        if getattr(ciphers, "in_etm", False):
            return self._read_etm(ciphers, seqnr)
        return self._read_classic(ciphers, seqnr)

    def _read_etm(self, ciphers: transport.SSHCiphers, seqnr: int) -> tuple[bytes, int, int] | None:
        buffer = self.buffer
        pos = self._pos
        length = self._length
        if length < 0:
            if len(buffer) - pos < 4:
                return None
            self._length = length = _checked_length(_LENGTH.unpack_from(buffer, pos)[0], ciphers.decBlockSize)
        ms = ciphers.verifyDigestSize
        end = pos + 4 + length
        if len(buffer) < end + ms:
            return None
        view = memoryview(buffer)
        try:
            # Authenticated before a byte of it is decrypted.
            if not ciphers.verify(seqnr, bytes(view[pos:end]), bytes(view[end : end + ms])):
                raise PacketError(transport.DISCONNECT_MAC_ERROR, b"bad MAC")
            body = bytes(ciphers.decrypt(view[pos + 4 : end]))
        finally:
            view.release()
        self._pos = end + ms
        self._length = -1
        return _unpadded(body, length)

    def _read_aead(
        self, aead: AESGCMPacketCipher | ChaCha20Poly1305PacketCipher, seqnr: int
    ) -> tuple[bytes, int, int] | None:
        buffer = self.buffer
        pos = self._pos
        length = self._length
        if length < 0:
            if len(buffer) - pos < 4:
                return None
            self._length = length = _checked_length(aead.packet_length(seqnr, buffer, pos), aead.block_size)
        end = pos + 4 + length + _TAG_SIZE
        if len(buffer) < end:
            return None
        view = memoryview(buffer)
        try:
            plain = aead.open(seqnr, view[pos:end], length)
        finally:
            view.release()
        if plain is None:
            raise PacketError(transport.DISCONNECT_MAC_ERROR, b"bad MAC")
        self._pos = end
        self._length = -1
        return _unpadded(plain, length)

    def _read_classic(self, ciphers: transport.SSHCiphers, seqnr: int) -> tuple[bytes, int, int] | None:
        buffer = self.buffer
        pos = self._pos
        bs = ciphers.decBlockSize
        first = self._first
        if first is None:
            if len(buffer) - pos < bs:
                return None
            first = bytes(ciphers.decrypt(bytes(buffer[pos : pos + bs])))
            length = _LENGTH_PADDING.unpack_from(first)[0]
            if length > MAX_PACKET_LENGTH:
                raise PacketError(transport.DISCONNECT_PROTOCOL_ERROR, b"bad packet length")
            if (length + 4) % bs != 0:
                raise PacketError(transport.DISCONNECT_PROTOCOL_ERROR, b"bad packet length")
            self._first = first
            self._length = length
        length = self._length
        ms = ciphers.verifyDigestSize
        end = pos + 4 + length
        if len(buffer) < end + ms:
            return None
        view = memoryview(buffer)
        try:
            packet = first + ciphers.decrypt(view[pos + bs : end])
            mac = bytes(view[end : end + ms])
        finally:
            view.release()
        if ms and not ciphers.verify(seqnr, packet, mac):
            raise PacketError(transport.DISCONNECT_MAC_ERROR, b"bad MAC")
        self._pos = end + ms
        self._first = None
        self._length = -1
        padding = first[4]
        if padding + 2 > length:
            raise PacketError(transport.DISCONNECT_PROTOCOL_ERROR, b"bad padding length")
        return packet, 5, 4 + length - padding


def _checked_length(length: int, block: int) -> int:
    """A packet length read in clear (AEAD, EtM): whole blocks, at least one, at most L{MAX_PACKET_LENGTH}."""
    if length > MAX_PACKET_LENGTH or length < block or length % block:
        raise PacketError(transport.DISCONNECT_PROTOCOL_ERROR, b"bad packet length")
    return length


def _unpadded(body: bytes, length: int) -> tuple[bytes, int, int]:
    """C{(body, start, end)} of a packet body that begins with its padding length (RFC 4253 6: at least 4)."""
    padding = body[0]
    if padding < 4 or padding + 2 > length:
        raise PacketError(transport.DISCONNECT_PROTOCOL_ERROR, b"bad padding length")
    return body, 1, length - padding
