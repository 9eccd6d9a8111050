"""
Packet protection for the gateway's SSH client transport: AEAD ciphers, a
faster HMAC, and a receive buffer that does not copy itself per packet.

AEAD ciphers (OpenSSH's names; none of them negotiates a separate MAC, the
MAC name list is ignored for a direction that uses one):

 - C{aes128-gcm@openssh.com}, C{aes256-gcm@openssh.com} (RFC 5647 with
   OpenSSH's changes, PROTOCOL section 1.6): the 4-byte packet length is sent
   in clear and authenticated as AAD; padding length, payload and padding are
   encrypted and a 16-byte tag follows.  The 12-byte nonce is the IV from key
   exchange -- a 4-byte fixed field and an 8-byte invocation counter that
   goes up by one per packet.  Padding makes (padding_length, payload,
   padding) a multiple of 16, with at least 4 bytes of padding.
 - C{chacha20-poly1305@openssh.com} (PROTOCOL.chacha20poly1305): the 64-byte
   key is K_2 (first 32 bytes, payload) and K_1 (last 32, length).  The
   packet length is encrypted on its own with K_1; the nonce is the packet
   sequence number; the Poly1305 key is the first 32 bytes of K_2's keystream
   block 0 and the rest of the packet is encrypted from block 1 on; the tag
   covers the encrypted length and the encrypted rest.  OpenSSH uses the
   original ChaCha20 (64-bit block counter, 64-bit nonce); C{cryptography}'s
   16-byte ChaCha20 "nonce" is the initial state words 12-15, so it is the
   little-endian 64-bit counter followed by the 8-byte big-endian sequence
   number.  Padding to a multiple of 8, length field excluded.

L{FastSSHCiphers} is Conch's C{SSHCiphers} for one key exchange, both
directions, plus L{FastSSHCiphers.seal} (one whole outgoing packet, for any
cipher) and, for an AEAD direction, C{in_aead}/C{out_aead}.  The transport
keeps swapping whole C{SSHCiphers} objects at C{NEWKEYS} as Conch does, so a
rekey may switch between AEAD and non-AEAD in either direction.

For the classic ciphers (encrypt-and-MAC), Conch builds a fresh
C{hmac.HMAC} (and a concatenated copy of the packet) for every packet;
L{FastSSHCiphers} keys one HMAC per direction once, at key exchange, and per
packet only copies that prepared state.

L{gateway.ssh.reader.PacketReader} takes packets out of the incoming byte stream: a C{bytearray}
read by offset and compacted once per read of the socket (Conch's
C{getPacket} re-slices its C{bytes} buffer, a copy of everything buffered,
for every packet), with AEAD ciphertext handed to C{cryptography} as
memoryviews.

The preference order puts AES-128-GCM first (AES-NI and carry-less multiply
make it the fastest on x86 and ARMv8), then ChaCha20-Poly1305 (fast without
AES instructions), AES-256-GCM, then the CTR ciphers with HMAC-SHA2-256 (the
faster MAC on CPUs with SHA extensions).  All remain strong choices.
"""

from __future__ import annotations

import hmac
import os
import struct
from collections.abc import Callable
from typing import Any, cast

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.ciphers import BlockCipherAlgorithm, Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.poly1305 import Poly1305
from twisted.conch.ssh import transport

from gateway.ssh._conch import conch_cipher, conch_mac, mac_key

AES128_GCM = b"aes128-gcm@openssh.com"
AES256_GCM = b"aes256-gcm@openssh.com"
CHACHA20_POLY1305 = b"chacha20-poly1305@openssh.com"

#: Offered ciphers, best first; the peer's first match in our list wins.
#: AES-GCM first: with AES-NI it costs the least CPU per byte here.
#: chacha20-poly1305 only to a server that agrees to strict key exchange
#: (L{gateway.ssh.handshake}): without it, chacha20 is open to the Terrapin
#: prefix-truncation attack (CVE-2023-48795); GCM and CTR+HMAC are not.
PREFERRED_CIPHERS = (
    AES128_GCM,
    AES256_GCM,
    CHACHA20_POLY1305,
    b"aes128-ctr",
    b"aes256-ctr",
    b"aes192-ctr",
)
#: Encrypt-then-MAC (OpenSSH PROTOCOL 1.7): the MAC covers the encrypted
#: packet, and the length goes in clear, so nothing is decrypted before it
#: is authenticated.  Each is its base HMAC, keyed the same way.
ETM_MACS = {
    b"hmac-sha2-256-etm@openssh.com": b"hmac-sha2-256",
    b"hmac-sha2-512-etm@openssh.com": b"hmac-sha2-512",
}
#: Offered MACs, best first (not used with an AEAD cipher): SHA-2 only, EtM first.
PREFERRED_MACS = (*ETM_MACS, b"hmac-sha2-256", b"hmac-sha2-512")

#: Conch's limit on an incoming packet's length field.
MAX_PACKET_LENGTH = 1 << 20

_SEQUENCE = struct.Struct(">L")
_LENGTH = struct.Struct(">L")
_LENGTH_PADDING = struct.Struct(">LB")
_HEADER = struct.Struct(">LBB")  # packet length, padding length, message type
_PADDING_TYPE = struct.Struct(">BB")  # padding length, message type
_GCM_NONCE = struct.Struct(">LQ")  # fixed field, invocation counter
_CHACHA_SEQUENCE = struct.Struct(">Q")
_CHACHA_COUNTER_0 = bytes(8)  # little-endian 64-bit block counter 0
_ZERO_BLOCK = bytes(64)
_MASK64 = (1 << 64) - 1
_TAG_SIZE = 16


class _RandomPadding:
    """
    Random padding bytes cut from a pool refilled by one C{getrandom} call
    per 64 KiB, instead of one system call per packet (Conch calls
    C{os.urandom} for every packet; a short-lived stream sends four or five).
    Every byte handed out is used once.
    """

    __slots__ = ("_pool", "_offset", "_source", "_pool_size")

    def __init__(self, source: Callable[[int], bytes] = os.urandom, pool_size: int = 65536) -> None:
        self._source = source
        self._pool_size = pool_size
        self._pool = b""
        self._offset = 0

    def __call__(self, size: int) -> bytes:
        end = self._offset + size
        if end > len(self._pool):
            self._pool = self._source(max(size, self._pool_size))
            self._offset, end = 0, size
        chunk = self._pool[self._offset : end]
        self._offset = end
        return chunk

    def discard(self) -> None:
        """Forget the pool, so a forked child does not reuse its parent's bytes."""
        self._pool = b""
        self._offset = 0


random_padding = _RandomPadding()
os.register_at_fork(after_in_child=random_padding.discard)


def offered(ours: tuple[bytes, ...], implemented: list[bytes]) -> list[bytes]:
    """The names of C{ours} that are C{implemented}, in our order: nothing else is offered."""
    return [name for name in ours if name in implemented]


class AESGCMPacketCipher:
    """One direction of C{aes128-gcm@openssh.com}/C{aes256-gcm@openssh.com}."""

    block_size = 16
    __slots__ = ("_aead", "_fixed", "_counter")

    def __init__(self, key: bytes, iv: bytes) -> None:
        self._aead = AESGCM(key)
        self._fixed, self._counter = _GCM_NONCE.unpack_from(iv)

    def _next_nonce(self) -> bytes:
        counter = self._counter
        self._counter = (counter + 1) & _MASK64
        return _GCM_NONCE.pack(self._fixed, counter)

    def seal(self, seqnr: int, message_type: int, payload: bytes, data: bytes = b"") -> bytes:
        """The wire form of one packet (payload C{payload + data}): clear length, ciphertext, tag."""
        size = 2 + len(payload) + len(data)
        padding = 16 - size % 16
        if padding < 4:
            padding += 16
        length = _LENGTH.pack(size + padding)
        body = b"".join((_PADDING_TYPE.pack(padding, message_type), payload, data, random_padding(padding)))
        return length + self._aead.encrypt(self._next_nonce(), body, length)

    def packet_length(self, seqnr: int, buffer: bytearray, pos: int) -> int:
        return _LENGTH.unpack_from(buffer, pos)[0]

    def open(self, seqnr: int, packet: memoryview, length: int) -> bytes | None:
        """
        The plaintext (padding length, payload, padding) of C{packet} (length
        field, ciphertext and tag), or None if it does not authenticate.
        """
        try:
            return self._aead.decrypt(self._next_nonce(), packet[4:], packet[:4])
        except InvalidTag:
            return None


class ChaCha20Poly1305PacketCipher:
    """One direction of C{chacha20-poly1305@openssh.com}."""

    block_size = 8
    __slots__ = ("_main_key", "_length_key")

    def __init__(self, key: bytes) -> None:
        if len(key) < 64:
            raise ValueError("chacha20-poly1305 needs a 64-byte key")
        self._main_key = key[:32]  # K_2
        self._length_key = key[32:64]  # K_1

    def seal(self, seqnr: int, message_type: int, payload: bytes, data: bytes = b"") -> bytes:
        """The wire form of one packet (payload C{payload + data}): encrypted length, ciphertext, tag."""
        size = 2 + len(payload) + len(data)
        padding = 8 - size % 8
        if padding < 4:
            padding += 8
        nonce = _CHACHA_COUNTER_0 + _CHACHA_SEQUENCE.pack(seqnr)
        length = (
            Cipher(algorithms.ChaCha20(self._length_key, nonce), None).encryptor().update(_LENGTH.pack(size + padding))
        )
        main = Cipher(algorithms.ChaCha20(self._main_key, nonce), None).encryptor()
        mac = Poly1305(main.update(_ZERO_BLOCK)[:32])  # the rest of block 0 is discarded
        body = main.update(
            b"".join((_PADDING_TYPE.pack(padding, message_type), payload, data, random_padding(padding)))
        )
        mac.update(length)
        mac.update(body)
        return b"".join((length, body, mac.finalize()))

    def packet_length(self, seqnr: int, buffer: bytearray, pos: int) -> int:
        nonce = _CHACHA_COUNTER_0 + _CHACHA_SEQUENCE.pack(seqnr)
        clear = (
            Cipher(algorithms.ChaCha20(self._length_key, nonce), None).decryptor().update(bytes(buffer[pos : pos + 4]))
        )
        return _LENGTH.unpack(clear)[0]

    def open(self, seqnr: int, packet: memoryview, length: int) -> bytes | None:
        nonce = _CHACHA_COUNTER_0 + _CHACHA_SEQUENCE.pack(seqnr)
        main = Cipher(algorithms.ChaCha20(self._main_key, nonce), None).decryptor()
        poly_key = main.update(_ZERO_BLOCK)[:32]
        end = 4 + length
        try:
            Poly1305.verify_tag(poly_key, packet[:end], bytes(packet[end:]))
        except InvalidSignature:
            return None
        return main.update(packet[4:end])


def _aes_gcm(key_size: int) -> Callable[[bytes, bytes], AESGCMPacketCipher]:
    def make(iv: bytes, key: bytes) -> AESGCMPacketCipher:
        return AESGCMPacketCipher(key[:key_size], iv[:12])

    return make


def _chacha20_poly1305(iv: bytes, key: bytes) -> ChaCha20Poly1305PacketCipher:
    return ChaCha20Poly1305PacketCipher(key[:64])


#: AEAD cipher name -> factory taking (IV, key) from key exchange.
AEAD_CIPHERS: dict[bytes, Callable[[bytes, bytes], AESGCMPacketCipher | ChaCha20Poly1305PacketCipher]] = {
    AES128_GCM: _aes_gcm(16),
    AES256_GCM: _aes_gcm(32),
    CHACHA20_POLY1305: _chacha20_poly1305,
}


def _works(name: bytes) -> bool:
    """Whether the cryptography backend can run cipher C{name}."""
    try:
        cipher = AEAD_CIPHERS[name](bytes(12), bytes(64))
        cipher.seal(0, 2, b"")
    except Exception:  # UnsupportedAlgorithm, or an OpenSSL built without it
        return False
    return True


def supported_aead_ciphers() -> list[bytes]:
    """The AEAD ciphers this backend supports, in our order of preference."""
    return [name for name in PREFERRED_CIPHERS if name in AEAD_CIPHERS and _works(name)]


SUPPORTED_AEAD_CIPHERS = supported_aead_ciphers()


class PacketError(Exception):
    """
    An incoming packet is malformed or forged: disconnect with C{reason}.

    C{description} names what was wrong, never the values read: those are
    the peer's bytes (a non-SSH peer's first bytes read as a length), and
    the text ends up in logs and in the cluster's C{last_error}.
    """

    def __init__(self, reason: int, description: bytes) -> None:
        super().__init__(reason, description)
        self.reason = reason
        self.description = description


def _block_bytes(cipher: Cipher[Any]) -> int:
    """The block size in bytes of one of Conch's classic ciphers: each is a block cipher (AES-CTR and the like)."""
    return cast(BlockCipherAlgorithm, cipher.algorithm).block_size // 8


def _unkeyed(seqnr: int, message_type: int, payload: bytes, data: bytes = b"") -> bytes:
    raise RuntimeError("keys not set")


class FastSSHCiphers(transport.SSHCiphers):
    """
    C{SSHCiphers} for one key exchange: AEAD ciphers as well as Conch's, HMAC
    state prepared once per key exchange, and whole-packet sealing.
    """

    #: C{seal(seqnr, message_type, payload[, data])}: the wire form of an
    #: outgoing packet whose payload is C{payload + data}, framed, padded and
    #: protected; C{data} (a CHANNEL_DATA message's data, after its header in
    #: C{payload}) is joined into the packet once, with the rest.  An
    #: attribute, not a method: C{setKeys} sets the direction's sealer
    #: itself, one call less per packet.
    seal: Callable[..., bytes] = staticmethod(_unkeyed)

    _out_hmac = None
    _in_hmac = None
    #: The AEAD cipher of a direction that uses one (else None).
    out_aead: AESGCMPacketCipher | ChaCha20Poly1305PacketCipher | None = None
    in_aead: AESGCMPacketCipher | ChaCha20Poly1305PacketCipher | None = None

    #: Whether a direction's MAC is encrypt-then-MAC (L{ETM_MACS}).
    out_etm = False
    in_etm = False

    def setKeys(self, outIV: bytes, outKey: bytes, inIV: bytes, inKey: bytes, outInteg: bytes, inInteg: bytes) -> None:
        # Conch knows the EtM MACs by their base names only: key them as those.
        names = self.outMACType, self.inMACType
        self.out_etm, self.in_etm = names[0] in ETM_MACS, names[1] in ETM_MACS
        self.outMACType, self.inMACType = (ETM_MACS.get(name, name) for name in names)
        try:
            self._set_keys(outIV, outKey, inIV, inKey, outInteg, inInteg)
        finally:
            self.outMACType, self.inMACType = names
        if self.out_aead is None and self.out_etm:
            self.seal = self._seal_etm

    def _set_keys(
        self, outIV: bytes, outKey: bytes, inIV: bytes, inKey: bytes, outInteg: bytes, inInteg: bytes
    ) -> None:
        out_aead = AEAD_CIPHERS.get(self.outCipType)
        in_aead = AEAD_CIPHERS.get(self.inCipType)
        if out_aead is None and in_aead is None:
            super().setKeys(outIV, outKey, inIV, inKey, outInteg, inInteg)
        else:
            # Conch's setKeys, one direction at a time.
            if out_aead is None:
                o = conch_cipher(self, self.outCipType, outIV, outKey)
                self.encryptor = o.encryptor()
                self.encBlockSize = _block_bytes(o)
                self.outMAC = conch_mac(self, self.outMACType, outInteg)
            else:
                self.out_aead = out_aead(outIV, outKey)
                self.encBlockSize = self.out_aead.block_size
            if in_aead is None:
                o = conch_cipher(self, self.inCipType, inIV, inKey)
                self.decryptor = o.decryptor()
                self.decBlockSize = _block_bytes(o)
                self.inMAC = conch_mac(self, self.inMACType, inInteg)
                if self.inMAC:
                    self.verifyDigestSize = self.inMAC[3]
            else:
                self.in_aead = in_aead(inIV, inKey)
                self.decBlockSize = self.in_aead.block_size
                self.verifyDigestSize = _TAG_SIZE
        if self.outMAC[0]:
            self._out_hmac = hmac.new(mac_key(self.outMAC), digestmod=self.outMAC[0])
        if self.inMAC[0]:
            self._in_hmac = hmac.new(mac_key(self.inMAC), digestmod=self.inMAC[0])
        self.seal = self.out_aead.seal if self.out_aead is not None else self._seal_classic

    def _seal_classic(self, seqnr: int, message_type: int, payload: bytes, data: bytes = b"") -> bytes:
        # RFC 4253 section 6, as Conch's sendPacket frames it, in one join.
        bs = self.encBlockSize
        size = 2 + len(payload) + len(data)
        padding = bs - (4 + size) % bs
        if padding < 4:
            padding += bs
        packet = b"".join((_HEADER.pack(size + padding, padding, message_type), payload, data, random_padding(padding)))
        return self.encryptor.update(packet) + self.makeMAC(seqnr, packet)

    def _seal_etm(self, seqnr: int, message_type: int, payload: bytes, data: bytes = b"") -> bytes:
        # The length in clear; what follows it padded to the block size on its
        # own, encrypted, then the MAC over sequence number, length and ciphertext.
        bs = self.encBlockSize
        padding = bs - (2 + len(payload) + len(data)) % bs
        if padding < 4:
            padding += bs
        body = b"".join((_PADDING_TYPE.pack(padding, message_type), payload, data, random_padding(padding)))
        head = _LENGTH.pack(len(body))
        encrypted = self.encryptor.update(body)
        return head + encrypted + self.makeMAC(seqnr, head + encrypted)

    def makeMAC(self, seqid: int, data: bytes) -> bytes:
        if self._out_hmac is None:
            return super().makeMAC(seqid, data)
        mac = self._out_hmac.copy()
        mac.update(_SEQUENCE.pack(seqid))
        mac.update(data)
        return mac.digest()

    def verify(self, seqid: int, data: bytes, mac: bytes) -> bool:
        if self._in_hmac is None:
            return super().verify(seqid, data, mac)
        expected = self._in_hmac.copy()
        expected.update(_SEQUENCE.pack(seqid))
        expected.update(data)
        return hmac.compare_digest(mac, expected.digest())
