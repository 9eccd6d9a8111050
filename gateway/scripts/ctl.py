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
import json
import os
import sys
import urllib.parse
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

from gateway.scripts.ctl_client import Client, Refusal
from gateway.scripts.ctl_errors import EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE, CtlError, one_line
from gateway.scripts.ctl_files import load_cluster, read_token, to_json

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

__all__ = [
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "CtlError",
    "load_cluster",
    "main",
]

DEFAULT_URL = "http://127.0.0.1:8765"
DEFAULT_TIMEOUT = 30.0


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


def _token(args: argparse.Namespace) -> str | None:
    if args.token is not None and args.token_file is not None:
        raise CtlError("give --token or --token-file, not both", EXIT_USAGE)
    token: str | None
    if args.token_file:
        token = read_token(os.path.expanduser(args.token_file), "--token-file", shown=args.token_file)
    else:
        token = (args.token if args.token is not None else os.environ.get("GATEWAY_CONTROL_TOKEN")) or None
    if token is not None and (not token.isprintable() or any(c.isspace() for c in token)):
        # http.client would refuse the header, quoting the token in its error.
        raise CtlError("the token contains white space or control characters", EXIT_USAGE)
    return token


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
    return one_line(value)


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
    body = to_json(load_cluster(args.file, args.name), args.file)
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
        name = f"gateway {_text(data['gateway'])} " if "gateway" in data else ""
        out.write(
            f"{name}{_text(data.get('status'))}: {_text(counts.get('up', 0))} clusters up, "
            f"{_text(counts.get('down', 0))} down\n"
        )
        reasons = data.get("not_ready")
        for reason in reasons if isinstance(reasons, list) else []:
            out.write(f"  not ready: {_text(reason)}\n")
        _write_store(data.get("store"), out)
    return EXIT_OK if healthy else EXIT_REFUSED


def _write_store(store: object, out: IO[str]) -> None:
    """A shared store's state, and the clusters this gateway refuses to serve (the file store: nothing to say)."""
    if not isinstance(store, dict) or store.get("backend") != "etcd":
        return
    line = f"  store: etcd {_text(store.get('state'))} at revision {_text(store.get('revision'))}"
    if store.get("last_error"):
        line += f" ({_text(store.get('last_error'))})"
    out.write(line + "\n")
    members = store.get("members")
    if isinstance(members, list) and members:
        out.write(f"  fleet: {', '.join(_text(m) for m in members)}\n")
    rejected = store.get("rejected")
    for name, reason in sorted(rejected.items()) if isinstance(rejected, dict) else []:
        out.write(f"  not served here: {_text(name)}: {_text(reason)}\n")


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
