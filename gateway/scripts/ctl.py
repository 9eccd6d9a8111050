"""
C{gateway-ctl}: manage a running gateway's clusters through its control API.

    gateway-ctl [--url URL] [--token T | --token-file F] [--json] list
    gateway-ctl [...] show NAME
    gateway-ctl [...] add NAME --file cluster.toml|cluster.json
    gateway-ctl [...] remove NAME
    gateway-ctl [...] health

C{--url} defaults to C{$GATEWAY_CONTROL_URL} or C{http://127.0.0.1:8765};
the bearer token to C{--token}, C{--token-file}, or C{$GATEWAY_CONTROL_TOKEN}.
The common options may also follow the command (C{gateway-ctl list --json}).

C{add} sends one cluster table, read from

 - a TOML file holding either the cluster's keys at the top level, or a
   C{[clusters.NAME]} table (e.g. a gateway configuration file: C{[listen]}
   and C{[gateway]} are ignored; C{[defaults]} is refused, as C{gateway-ctl}
   does not apply it -- copy the keys the cluster needs into its table);
 - a JSON file of the same two shapes (C{{"user": ...}} or
   C{{"clusters": {"NAME": {...}}}}).

Files named in the table are read *here*, so the gateway never needs to see
the operator's files: C{key_file} is sent as C{key} (PEM text),
C{passphrase_file} as C{passphrase} (trailing newline removed) and
C{token_file} as C{token} (surrounding white space removed).  Like the
gateway's configuration loader, these secret files must not be readable by
other users.  C{known_hosts} stays a path, read by the gateway (which refuses
it unless C{[gateway] api_file_paths = true}; use C{host_keys}): a relative one
is made absolute against the file's directory.  Relative paths are resolved
against the directory of the file that names them; C{~} is expanded.

Exit status: 0 done, 1 the gateway refused the request (invalid cluster,
unknown cluster, conflict, authentication), 2 usage or local file error,
3 the control API could not be reached.  Every failure is one line on
standard error.  The token and key material are never printed.

Only the standard library is used, and the environment's HTTP proxy settings
are ignored (the bearer token goes straight to the gateway), as are
redirects.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import stat
import sys
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

DEFAULT_URL = "http://127.0.0.1:8765"
DEFAULT_TIMEOUT = 30.0

EXIT_OK = 0
#: The gateway answered but refused (400, 401, 404, 409, 5xx, ...).
EXIT_REFUSED = 1
#: Bad command line, or a local file that cannot be read or parsed.
EXIT_USAGE = 2
#: Nothing (or no HTTP) answered at the URL.
EXIT_UNREACHABLE = 3

#: Secret files larger than this are refused (as by the gateway's loader).
MAX_FILE_BYTES = 1024 * 1024

#: Top-level tables of a gateway configuration file that say nothing about
#: one cluster, ignored next to C{[clusters.NAME]}.
_IGNORED_TABLES = ("listen", "gateway")

#: C{refused(status, reason, field)}: the message for a refusal a command
#: expects (a 404 for a name), or None for the generic one.
Refusal = Callable[[int, str, str | None], str | None]


class CtlError(Exception):
    """A failure to report on one line, with the exit status to return."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class _Exit(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """An argument parser that writes to given streams and never exits."""

    def __init__(self, *args: Any, out: IO[str], err: IO[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._out = out
        self._err = err

    def print_usage(self, file: SupportsWrite[str] | None = None) -> None:
        super().print_usage(file or self._out)

    def print_help(self, file: SupportsWrite[str] | None = None) -> None:
        super().print_help(file or self._out)

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        if message:
            self._err.write(message)
        raise _Exit(status)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(self._err)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _common_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """
    The options accepted before the command (C{top}) and after it; after it
    they default to SUPPRESS so that they do not undo what came before.
    """

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    parser.add_argument(
        "--url",
        default=default(os.environ.get("GATEWAY_CONTROL_URL") or DEFAULT_URL),
        help=f"control API base URL (default: $GATEWAY_CONTROL_URL or {DEFAULT_URL})",
    )
    tokens = parser.add_mutually_exclusive_group()
    tokens.add_argument(
        "--token",
        default=default(None),
        help="bearer token (default: $GATEWAY_CONTROL_TOKEN)",
    )
    tokens.add_argument(
        "--token-file",
        metavar="FILE",
        default=default(None),
        help="read the bearer token from FILE",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print the gateway's JSON answer instead of text",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        default=default(DEFAULT_TIMEOUT),
        help=f"give up on a request after SECONDS (default: {DEFAULT_TIMEOUT:g})",
    )


def parse_args(argv: list[str], out: IO[str], err: IO[str]) -> argparse.Namespace:
    parser = _Parser(
        prog="gateway-ctl",
        description="Manage the clusters of a running gateway through its control API.",
        out=out,
        err=err,
    )
    _common_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    def command(name: str, help: str) -> _Parser:
        """A command's parser, writing to the same streams."""
        return commands.add_parser(name, help=help, out=out, err=err)

    sub = command("list", "list the clusters and their state")
    _common_options(sub, top=False)
    sub = command("show", "show one cluster's settings and status")
    sub.add_argument("name", metavar="NAME")
    _common_options(sub, top=False)
    sub = command("add", "create or replace a cluster from a TOML or JSON file")
    sub.add_argument("name", metavar="NAME")
    sub.add_argument(
        "--file",
        "-f",
        required=True,
        metavar="FILE",
        help="cluster.toml or cluster.json: the cluster's keys, or a [clusters.NAME] table",
    )
    _common_options(sub, top=False)
    sub = command("remove", "remove a cluster added through the API")
    sub.add_argument("name", metavar="NAME")
    _common_options(sub, top=False)
    sub = command("health", "check that the gateway answers; count clusters up and down")
    _common_options(sub, top=False)

    args = parser.parse_args(argv)
    if getattr(args, "name", None) == "":
        parser.error("NAME must not be empty")
    if not args.timeout > 0:
        parser.error("--timeout must be positive")
    parts = urllib.parse.urlsplit(args.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        parser.error(f"--url must be an http:// or https:// URL, not {args.url!r}")
    return args


# -- local files ---------------------------------------------------------------


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _resolve(path: str, base_dir: str) -> str:
    path = os.path.expanduser(path)
    if not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    return os.path.normpath(path)


def _read_secret(path: str, what: str, where: str) -> bytes:
    """
    Read a secret file, refusing one that other users can read.

    The gateway's reader is L{gateway.config.secrets.read_secret_file}; this
    twin stays because gateway-ctl runs on the standard library alone, and
    importing C{gateway.config} loads Twisted.
    """
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISREG(mode) and mode & 0o077:
            raise CtlError(
                f"{where}: {what} {path!r} is accessible by other users (mode {stat.S_IMODE(mode):04o}): chmod 600 it",
                EXIT_USAGE,
            )
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise CtlError(f"{where}: cannot read {what} {path!r}: {e.strerror or type(e).__name__}", EXIT_USAGE) from None
    if len(data) > MAX_FILE_BYTES:
        raise CtlError(f"{where}: {what} {path!r} is larger than {MAX_FILE_BYTES} bytes", EXIT_USAGE)
    return data


def _parse_file(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise CtlError(f"cannot read {path}: {e.strerror or type(e).__name__}", EXIT_USAGE) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CtlError(f"{path}: not UTF-8 text (byte {e.start})", EXIT_USAGE) from None
    if path.lower().endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise CtlError(
                f"{path}: invalid JSON: {e.msg} (at line {e.lineno}, column {e.colno})", EXIT_USAGE
            ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise CtlError(f"{path}: invalid TOML: {e}", EXIT_USAGE) from None


def _cluster_table(data: Any, path: str, name: str) -> tuple[dict[str, Any], str]:
    """The cluster's table in the parsed file, and the dotted prefix of its keys."""
    if not isinstance(data, dict):
        raise CtlError(f"{path}: expected a table (JSON object) of cluster keys", EXIT_USAGE)
    if "clusters" not in data:
        return data, ""
    clusters = data["clusters"]
    if not isinstance(clusters, dict):
        raise CtlError(f"{path}: clusters: expected a table of clusters", EXIT_USAGE)
    if "defaults" in data:
        raise CtlError(
            f"{path}: defaults: [defaults] is not applied by gateway-ctl add: "
            f"copy the keys the cluster needs into [clusters.{name}]",
            EXIT_USAGE,
        )
    others = sorted(k for k in data if k not in ("clusters", *_IGNORED_TABLES))
    if others:
        raise CtlError(f"{path}: {others[0]}: unexpected key next to [clusters]", EXIT_USAGE)
    if name not in clusters:
        have = ", ".join(sorted(clusters)) or "none"
        raise CtlError(f"{path}: no [clusters.{name}] table (clusters in the file: {have})", EXIT_USAGE)
    table = clusters[name]
    if not isinstance(table, dict):
        raise CtlError(f"{path}: clusters.{name}: expected a table of cluster keys", EXIT_USAGE)
    return table, f"clusters.{name}."


def load_cluster(path: str, name: str) -> dict[str, Any]:
    """
    The body to PUT for cluster C{name} from the TOML or JSON file C{path}:
    its cluster table, with C{key_file}, C{passphrase_file} and C{token_file}
    replaced by the contents they name and C{known_hosts} made absolute.

    Raise L{CtlError} (L{EXIT_USAGE}) naming the file and key.
    """
    table, prefix = _cluster_table(_parse_file(path), path, name)
    body = dict(table)
    base_dir = os.path.dirname(os.path.abspath(path))

    def where(key: str) -> str:
        return f"{path}: {prefix}{key}"

    def file_value(key: str, inline_as: str) -> str | None:
        if key not in body:
            return None
        if inline_as in body:
            raise CtlError(
                f"{where(inline_as)}: {inline_as} and {key} are mutually exclusive: set only one", EXIT_USAGE
            )
        value = body.pop(key)
        if not isinstance(value, str) or not value:
            raise CtlError(f"{where(key)}: expected a file path (a non-empty string)", EXIT_USAGE)
        return _resolve(value, base_dir)

    key_path = file_value("key_file", "key")
    if key_path is not None:
        data = _read_secret(key_path, "key file", where("key_file"))
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise CtlError(f"{where('key_file')}: key file {key_path!r} is not a text (PEM) key", EXIT_USAGE) from None
        if "PRIVATE KEY-----" not in text:
            public = "PUBLIC KEY-----" in text or text.lstrip().startswith(("ssh-", "ecdsa-"))
            why = "this is a public key: a private key is needed" if public else "not an OpenSSH or PEM private key"
            raise CtlError(f"{where('key_file')}: key file {key_path!r}: {why}", EXIT_USAGE)
        body["key"] = text

    passphrase_path = file_value("passphrase_file", "passphrase")
    if passphrase_path is not None:
        data = _read_secret(passphrase_path, "passphrase file", where("passphrase_file"))
        try:
            passphrase = data.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise CtlError(
                f"{where('passphrase_file')}: passphrase file {passphrase_path!r} is not UTF-8 text", EXIT_USAGE
            ) from None
        if not passphrase:
            raise CtlError(f"{where('passphrase_file')}: passphrase file {passphrase_path!r} is empty", EXIT_USAGE)
        body["passphrase"] = passphrase

    token_path = file_value("token_file", "token")
    if token_path is not None:
        data = _read_secret(token_path, "token file", where("token_file"))
        try:
            token = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise CtlError(f"{where('token_file')}: token file {token_path!r} is not UTF-8 text", EXIT_USAGE) from None
        if not token:
            raise CtlError(f"{where('token_file')}: token file {token_path!r} is empty", EXIT_USAGE)
        body["token"] = token

    known_hosts = body.get("known_hosts")
    if isinstance(known_hosts, str) and known_hosts:
        body["known_hosts"] = _resolve(known_hosts, base_dir)

    return body


def _to_json(body: Mapping[str, Any], path: str) -> bytes:
    def refuse(value: object) -> object:
        raise CtlError(f"{path}: a value of type {type(value).__name__} cannot be sent as JSON", EXIT_USAGE)

    return json.dumps(body, default=refuse).encode("utf-8")


def _token(args: argparse.Namespace) -> str | None:
    if args.token is not None and args.token_file is not None:
        raise CtlError("give --token or --token-file, not both", EXIT_USAGE)
    token: str | None
    if args.token_file:
        data = _read_secret(os.path.expanduser(args.token_file), "token file", "--token-file")
        try:
            token = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise CtlError(f"--token-file: token file {args.token_file!r} is not UTF-8 text", EXIT_USAGE) from None
        if not token:
            raise CtlError(f"--token-file: token file {args.token_file!r} is empty", EXIT_USAGE)
    else:
        token = (args.token if args.token is not None else os.environ.get("GATEWAY_CONTROL_TOKEN")) or None
    if token is not None and (not token.isprintable() or any(c.isspace() for c in token)):
        # http.client would refuse the header, quoting the token in its error.
        raise CtlError("the token contains white space or control characters", EXIT_USAGE)
    return token


# -- HTTP ----------------------------------------------------------------------


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
        return CtlError(f"cannot reach the gateway control API at {self.url}: {_one_line(text)}", EXIT_UNREACHABLE)

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
            reason = _one_line(answer.get("error") or "")
            field = _one_line(answer["field"]) if answer.get("field") else None
        if status == 401:
            if self.token is None:
                return CtlError("authentication failed: give --token or GATEWAY_CONTROL_TOKEN", EXIT_REFUSED)
            return CtlError(
                "authentication failed: the gateway refused the token (check --token or GATEWAY_CONTROL_TOKEN)",
                EXIT_REFUSED,
            )
        message = refused(status, reason, field) if refused is not None else None
        if not message:
            detail = reason or _one_line(http_reason) or "no reason given"
            if field:
                detail = f"{field}: {detail}"
            if 300 <= status < 400:
                detail = f"redirected ({detail}); is --url the gateway control API?"
            message = f"the gateway refused the request (HTTP {status}): {detail}"
        return CtlError(message, EXIT_REFUSED)


# -- commands ------------------------------------------------------------------


def _cluster_path(name: str) -> str:
    return "/v1/clusters/" + urllib.parse.quote(name, safe="")


def _no_such(name: str) -> Refusal:
    def refused(status: int, reason: str, field: str | None) -> str | None:
        if status == 404:
            return f"no cluster named {name}"
        return None

    return refused


def _print_json(data: Any, out: IO[str]) -> None:
    out.write(json.dumps(data, indent=2) + "\n")


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ", ".join(_text(v) for v in value) if value else "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_text(v)}" for k, v in value.items()) if value else "-"
    return _one_line(value)


def _expect(data: Any, kind: type, what: str, url: str) -> Any:
    if not isinstance(data, kind):
        raise CtlError(f"unexpected answer from {url}: {what}", EXIT_REFUSED)
    return data


def cmd_list(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    _, data = client.request("GET", "/v1/clusters")
    if args.json:
        _print_json(data, out)
        return EXIT_OK
    clusters = _expect(data, dict, "no clusters list", client.url).get("clusters")
    clusters = _expect(clusters, list, "no clusters list", client.url)
    rows: list[tuple[str, ...]] = [("NAME", "STATE", "PROXY", "STREAMS", "LAST ERROR")]
    for cluster in clusters:
        cluster = _expect(cluster, dict, "a cluster is not an object", client.url)
        rows.append(tuple(_text(cluster.get(key)) for key in ("name", "state", "proxy", "open_streams", "last_error")))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)]
        out.write("  ".join([*cells, row[4]]) + "\n")
    return EXIT_OK


def cmd_show(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    _, data = client.request("GET", _cluster_path(args.name), refused=_no_such(args.name))
    if args.json:
        _print_json(data, out)
        return EXIT_OK
    data = _expect(data, dict, "the cluster is not an object", client.url)
    out.write(f"name: {_text(data.get('name', args.name))}\n")
    out.write(f"source: {_text(data.get('source'))}\n")
    for section in ("status", "settings"):
        values = data.get(section)
        if not isinstance(values, dict):
            continue
        out.write(f"{section}:\n")
        width = max((len(str(k)) for k in values), default=0)
        for key, value in values.items():
            out.write(f"  {str(key) + ':':<{width + 1}} {_text(value)}\n")
    return EXIT_OK


def cmd_add(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    body = _to_json(load_cluster(args.file, args.name), args.file)
    name = args.name

    def refused(status: int, reason: str, field: str | None) -> str | None:
        if status == 400:
            return f"invalid cluster: {field}: {reason}" if field else f"invalid cluster: {reason or 'refused'}"
        if status == 409:
            return f"cannot add cluster {name}: {reason or 'conflict'}"
        return None

    status, data = client.request("PUT", _cluster_path(name), body, refused=refused)
    if args.json:
        if data is not None:
            _print_json(data, out)
        return EXIT_OK
    out.write(f"{'created' if status == 201 else 'replaced'} cluster {name}\n")
    return EXIT_OK


def cmd_remove(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    name = args.name
    no_such = _no_such(name)

    def refused(status: int, reason: str, field: str | None) -> str | None:
        if status == 409:
            return f"cannot remove cluster {name}: {reason or 'conflict'}"
        return no_such(status, reason, field)

    _, data = client.request("DELETE", _cluster_path(name), refused=refused)
    if args.json:
        if data is not None:
            _print_json(data, out)
        return EXIT_OK
    out.write(f"removed cluster {name}\n")
    return EXIT_OK


def cmd_health(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    _, data = client.request("GET", "/v1/health")
    data = _expect(data, dict, "the health answer is not an object", client.url)
    healthy = data.get("status") == "ok"
    if args.json:
        _print_json(data, out)
    else:
        counts = data.get("clusters") if isinstance(data.get("clusters"), dict) else {}
        out.write(
            f"{_text(data.get('status'))}: {_text(counts.get('up', 0))} clusters up, "
            f"{_text(counts.get('down', 0))} down\n"
        )
    return EXIT_OK if healthy else EXIT_REFUSED


COMMANDS: dict[str, Callable[[Client, argparse.Namespace, IO[str]], int]] = {
    "list": cmd_list,
    "show": cmd_show,
    "add": cmd_add,
    "remove": cmd_remove,
    "health": cmd_health,
}


def main(argv: list[str] | None = None, stdout: IO[str] | None = None, stderr: IO[str] | None = None) -> int:
    """Run one command; return the exit status."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv, out, err)
    except _Exit as e:
        return e.status
    try:
        client = Client(args.url, _token(args), args.timeout)
        return COMMANDS[args.command](client, args, out)
    except CtlError as e:
        err.write(f"gateway-ctl: {e}\n")
        return e.status


if __name__ == "__main__":
    sys.exit(main())
