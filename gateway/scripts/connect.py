"""
C{gateway-connect}: a netcat-like ProxyCommand through the gateway's SOCKS5
listener.

    gateway-connect [--socks HOST:PORT] [--cluster NAME] [--token T] HOST PORT

Connects to C{HOST:PORT} through the gateway and relays standard input and
output, so it works as OpenSSH's C{ProxyCommand}, as
C{paramiko.ProxyCommand(...)}, and as Sahara's
C{proxy_command = gateway-connect --cluster {network_id} {host} {port}}.

It is started once per SSH connection, so it imports only the standard
library and L{gateway.proxy.socks.replies} (no reactor, no SOCKS machine, no
argparse, no dataclasses; ipaddress when the destination is parsed): a start
takes ~17-20 ms, ~8 ms of it the interpreter's own (tests/test_connect.py pins
the import set).  Failures go to standard error in words, with the SOCKS
reason, and a non-zero exit status.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import sys

from gateway.proxy.socks.replies import SOCKS5_REPLY_TEXT

DEFAULT_SOCKS = "127.0.0.1:1080"

#: Exit status: the gateway could not be reached / refused the stream.
EXIT_UNREACHABLE = 2
EXIT_REFUSED = 3
#: Arguments SOCKS5 cannot carry: a usage error, argparse's status.
EXIT_USAGE = 2
#: RFC 1928 / 1929: a domain name, a username and a password are 1..255 bytes.
_MAX_FIELD = 255


class ConnectError(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


#: The options in argparse's order, which abbreviations and "ambiguous option" follow.
_LONG_OPTIONS = ("--help", "--socks", "--cluster", "--token", "--timeout")
_OPTIONS = frozenset(("-h", *_LONG_OPTIONS))
_SEPARATOR = "--"

_USAGE = """\
usage: gateway-connect [-h] [--socks SOCKS] [--cluster CLUSTER]
                       [--token TOKEN] [--timeout TIMEOUT]
                       host port
"""

_HELP = (
    _USAGE
    + """
Relay stdin/stdout to HOST:PORT through the gateway's SOCKS5 listener.

positional arguments:
  host
  port

options:
  -h, --help         show this help message and exit
  --socks SOCKS      gateway SOCKS listener, HOST:PORT or unix:PATH (default:
                     $GATEWAY_SOCKS or {socks})
  --cluster CLUSTER  cluster name or alias (default: $GATEWAY_CLUSTER; route
                     by address)
  --token TOKEN      the cluster's token (default: $GATEWAY_TOKEN)
  --timeout TIMEOUT  seconds for the handshake (default: 30)
"""
)


class _UsageError(Exception):
    """A command line argparse would refuse; the message is argparse's."""


class Arguments:
    """What the command line asked for, with the environment's defaults."""

    __slots__ = ("socks", "cluster", "token", "timeout", "host", "port")
    host: str
    port: int

    def __init__(self) -> None:
        self.socks = os.environ.get("GATEWAY_SOCKS", DEFAULT_SOCKS)
        self.cluster = os.environ.get("GATEWAY_CLUSTER")
        self.token = os.environ.get("GATEWAY_TOKEN")
        self.timeout = 30.0


def _is_negative_number(arg: str) -> bool:
    """argparse's C{^-\\d+$|^-\\d*\\.\\d+$} (C{\\d} is C{isdecimal}), without importing re."""
    whole, dot, fraction = arg[1:].partition(".")
    if dot:
        return (not whole or whole.isdecimal()) and fraction.isdecimal()
    return whole.isdecimal()


def _classify(arg: str) -> tuple[str, str | None] | None:
    """
    What argparse makes of C{arg} before it consumes any: C{None} for a
    positional, else the option and the value after its C{=} (or after
    C{-h}), the option C{""} for one it does not know.

    @raise _UsageError: an abbreviation that fits several options.
    """
    if not arg.startswith("-") or arg == "-":
        return None
    if arg in _OPTIONS:
        return arg, None
    name, equals, value = arg.partition("=")
    if equals and name in _OPTIONS:
        return name, value
    if arg.startswith("--"):
        matches = [option for option in _LONG_OPTIONS if option.startswith(name)]
        if len(matches) > 1:
            raise _UsageError(f"ambiguous option: {arg} could match {', '.join(matches)}")
        if matches:
            return matches[0], value if equals else None
    elif arg.startswith("-h"):
        return "-h", arg[2:]
    if _is_negative_number(arg) or " " in arg:
        return None
    return "", None


def _help_requested(option: str, explicit: str | None) -> bool:
    """
    C{-h}/C{--help}, also with a value after C{=} or C{-h}: argparse reads
    C{-hh} as C{-h -h} and refuses any other value.

    @raise _UsageError: for a value.
    """
    if explicit is None:
        return True
    rest = explicit.lstrip("h") if option == "-h" else explicit
    if explicit and not rest:
        return True
    raise _UsageError(f"argument -h/--help: ignored explicit argument {rest!r}")


def _parse(argv: list[str]) -> Arguments:
    """argparse's reading of C{argv} for gateway-connect's options, errors in its order."""
    items: list[tuple[str, tuple[str, str | None] | None]] = []
    for i, arg in enumerate(argv):
        if arg == _SEPARATOR:  # the rest are positionals, whatever they look like
            items += [(arg, (_SEPARATOR, None))] + [(rest, None) for rest in argv[i + 1 :]]
            break
        items.append((arg, _classify(arg)))
    args = Arguments()
    default_socks = args.socks  # what the help shows, whatever --socks said before -h
    host: str | None = None
    port: int | None = None
    extras = []
    position = 0
    filled = False  # whether the item before took the host or the port
    while position < len(items):
        arg, option = items[position]
        position += 1
        if option is None:
            filled = host is None or port is None
            if host is None:
                host = arg
            elif port is None:
                try:
                    port = int(arg)
                except ValueError:
                    raise _invalid("port", "int", arg) from None
            else:
                extras.append(arg)
            continue
        name, value = option
        if name == _SEPARATOR:
            # argparse drops it when it sits next to the host or the port, else it is left over.
            if not (filled or (position < len(items) and (host is None or port is None))):
                extras.append(arg)
            continue
        filled = False
        if not name:
            extras.append(arg)
        elif name in ("-h", "--help"):
            if _help_requested(name, value):
                _write(_HELP.format(socks=default_socks))
                raise SystemExit(0)
        else:
            if value is None:
                if position == len(items) or items[position][1] is not None:
                    raise _UsageError(f"argument {name}: expected one argument")
                value = items[position][0]
                position += 1
            if name == "--timeout":
                try:
                    args.timeout = float(value)
                except ValueError:
                    raise _invalid(name, "float", value) from None
            else:
                setattr(args, name[2:], value)  # --socks, --cluster, --token: the attribute's name
    if host is None or port is None:
        missing = [name for name, given in (("host", host), ("port", port)) if given is None]
        raise _UsageError(f"the following arguments are required: {', '.join(missing)}")
    if extras:
        raise _UsageError(f"unrecognized arguments: {' '.join(extras)}")
    args.host, args.port = host, port
    return args


def _invalid(name: str, kind: str, text: str) -> _UsageError:
    return _UsageError(f"argument {name}: invalid {kind} value: {text!r}")


def _write(text: str, stream: str = "stdout") -> None:
    """Write like argparse does: a reader that is gone is no error."""
    try:
        getattr(sys, stream).write(text)
    except OSError:
        pass


def parse_args(argv: list[str]) -> Arguments:
    """
    The command line, read as argparse read it (same options, abbreviations,
    help and messages; a usage error exits with status 2) -- by hand,
    because importing and running argparse (with re, gettext, shutil) took
    4-8 ms of a ~25 ms start.  The help is argparse's at 80 columns.
    """
    try:
        return _parse(argv)
    except _UsageError as e:
        _write(f"{_USAGE}gateway-connect: error: {e}\n", "stderr")
        raise SystemExit(EXIT_USAGE) from None


def _socks_socket(spec: str, timeout: float) -> socket.socket:
    """Connect to the gateway's listener named by C{spec}."""
    try:
        if spec.startswith("unix:"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(spec[len("unix:") :])
            return sock
        host, _, port = spec.rpartition(":")
        return socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except (OSError, ValueError) as e:
        raise ConnectError(f"cannot reach the gateway at {spec}: {e}", EXIT_UNREACHABLE) from None


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectError("the gateway closed the connection during the handshake", EXIT_REFUSED)
        data += chunk
    return data


def _address(host: str) -> bytes:
    """The SOCKS5 address of C{host}: an IP literal, else an IDNA-encoded name."""
    import ipaddress  # here, not at the top: --help and usage errors need not load it

    if not host:
        raise ConnectError("the host name is empty", EXIT_USAGE)
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        try:
            name = host.encode("idna")
        except UnicodeError:  # an empty label, one over 63 characters, a bad code point
            raise ConnectError(f"{ascii(host[:64])} is not a valid host name", EXIT_USAGE) from None
        if not 0 < len(name) <= _MAX_FIELD:
            raise ConnectError(f"the host name is longer than {_MAX_FIELD} bytes", EXIT_USAGE)
        return b"\x03" + bytes([len(name)]) + name
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        raise ConnectError("IPv6 zone ids are not accepted: the gateway cannot use them", EXIT_USAGE)
    return (b"\x01" if ip.version == 4 else b"\x04") + ip.packed


def _field(value: str, what: str) -> bytes:
    """A username or password as RFC 1929 carries it (never echoed: it may be a token)."""
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes in argv or the environment
        raise ConnectError(f"the {what} is not valid UTF-8", EXIT_USAGE) from None
    if len(data) > _MAX_FIELD:
        raise ConnectError(f"the {what} is longer than {_MAX_FIELD} bytes (the SOCKS5 limit)", EXIT_USAGE)
    return bytes([len(data)]) + data


class Handshake:
    """
    What gateway-connect will send, encoded before any connection is made, so
    that arguments SOCKS5 cannot carry are a usage error and not a traceback
    halfway through the handshake.  (A plain class: importing dataclasses
    would cost more than this whole script's start.)
    """

    __slots__ = ("destination", "cluster", "credentials", "request")

    def __init__(self, destination: str, cluster: str | None, credentials: bytes | None, request: bytes) -> None:
        self.destination = destination
        self.cluster = cluster
        #: The RFC 1929 subnegotiation, or C{None} for "no authentication".
        self.credentials = credentials
        self.request = request

    @classmethod
    def build(cls, host: str, port: int, cluster: str | None, token: str | None) -> Handshake:
        """@raise ConnectError: with C{EXIT_USAGE}, saying which argument is wrong."""
        if not 1 <= port <= 65535:
            raise ConnectError(f"port {port} is not between 1 and 65535", EXIT_USAGE)
        request = b"\x05\x01\x00" + _address(host) + struct.pack(">H", port)
        credentials = None
        if cluster:
            credentials = b"\x01" + _field(cluster, "cluster name") + _field(token or "", "token")
        return cls(f"{host}:{port}", cluster or None, credentials, request)


def socks5_connect(sock: socket.socket, handshake: Handshake) -> None:
    """Run the SOCKS5 handshake on C{sock}; raise L{ConnectError} on refusal."""
    cluster = handshake.cluster
    method = b"\x02" if handshake.credentials else b"\x00"
    sock.sendall(b"\x05\x01" + method)
    version, chosen = _read_exactly(sock, 2)
    if version != 5 or chosen != method[0]:
        raise ConnectError(
            "the gateway did not accept "
            + ("username/password authentication" if cluster else "unauthenticated access")
            + (" (give --cluster)" if not cluster else ""),
            EXIT_REFUSED,
        )
    if handshake.credentials:
        sock.sendall(handshake.credentials)
        _, status = _read_exactly(sock, 2)
        if status != 0:
            raise ConnectError(
                f"the gateway rejected the credentials for cluster {cluster!r} (unknown cluster or wrong token)",
                EXIT_REFUSED,
            )
    sock.sendall(handshake.request)
    _, reply, _, address_type = _read_exactly(sock, 4)
    bound = {1: 4, 4: 16}.get(address_type)
    if bound is None:
        bound = _read_exactly(sock, 1)[0]
    _read_exactly(sock, bound + 2)
    if reply != 0:
        words = SOCKS5_REPLY_TEXT.get(reply, "unknown reply")
        raise ConnectError(
            f"the gateway could not connect to {handshake.destination}: {words} (SOCKS5 reply {reply:#04x})",
            EXIT_REFUSED,
        )


def _write_all(fd: int, data: bytes) -> bool:
    """Write C{data} to C{fd}; C{False} if its reader is gone (the SSH client exited)."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except BrokenPipeError:
        return False
    return True


def relay(sock: socket.socket, stdin: int = 0, stdout: int = 1) -> None:
    """
    Copy stdin to C{sock} and C{sock} to stdout until both directions end,
    or until whoever reads stdout has closed it: then nobody is left to
    serve, which is a normal end.  (A broken pipe on C{sock} is a lost
    stream instead, and raises.)
    """
    sock.setblocking(True)
    sock.settimeout(None)
    # poll, not epoll (selectors' default): epoll refuses a file or /dev/null as stdin.
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(stdin, select.POLLIN)
    open_directions = 2
    try:
        while open_directions:
            for fd, _ in poller.poll():
                if fd == stdin:
                    data = os.read(stdin, 65536)
                    if data:
                        sock.sendall(data)
                    else:
                        poller.unregister(stdin)
                        sock.shutdown(socket.SHUT_WR)
                        open_directions -= 1
                else:
                    data = sock.recv(65536)
                    if data:
                        if not _write_all(stdout, data):
                            return
                    else:
                        poller.unregister(sock)
                        os.close(stdout)
                        open_directions -= 1
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        handshake = Handshake.build(args.host, args.port, args.cluster, args.token)
        sock = _socks_socket(args.socks, args.timeout)
        try:
            socks5_connect(sock, handshake)
        except OSError as e:
            raise ConnectError(f"handshake with the gateway failed: {e}", EXIT_UNREACHABLE) from None
        relay(sock)
    except ConnectionError as e:
        print(f"gateway-connect: connection to {handshake.destination} lost: {e}", file=sys.stderr)
        return 1
    except ConnectError as e:
        print(f"gateway-connect: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
