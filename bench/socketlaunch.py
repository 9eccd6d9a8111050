"""
Socket activation by hand, as systemd does it: bind one listening TCP
socket, then start N copies of a command (each C{{i}} in it replaced by the
copy's number, from 1: a log file each) that each inherit it as file
descriptor 3 (C{LISTEN_FDS=1}, C{LISTEN_FDNAMES}, C{LISTEN_PID} set to the
child's own pid, which only a fork-then-exec can know).  A gateway child
listens on it with the endpoint string C{systemd:domain=INET:index=0}: N
gateway processes then accept from one socket, and the kernel hands each
connection to whichever is waiting in C{accept} (every waiting process is
woken; one wins).

With C{--reuseport} each child gets a socket of its own instead, all bound
to the same address with C{SO_REUSEPORT} (systemd's C{ReusePort=}): the
kernel then spreads connections over them by a hash of the client's address
and port, waking one process, whether or not it is busy.

    python bench/socketlaunch.py HOST:PORT N NAME [--reuseport] -- COMMAND...

Prints one JSON line (the children's pids) once they run, forwards SIGTERM
to each child by its pid, and exits when they all have.  Every child gets
SIGTERM if the launcher dies (C{setpriv --pdeathsig}).  Stdlib only: it
runs inside a lab namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys

#: systemd's first inherited descriptor (sd_listen_fds(3)).
LISTEN_FDS_START = 3


def listening_socket(host: str, port: int, reuseport: bool, backlog: int = 50) -> socket.socket:
    """A TCP socket bound and listening, with twistd's default backlog (50)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


def spawn(sock: socket.socket, name: str, argv: list[str]) -> int:
    """Fork and exec C{argv} with C{sock} as descriptor 3 and the systemd variables naming this child."""
    pid = os.fork()
    if pid:
        return pid
    try:
        if sock.fileno() != LISTEN_FDS_START:
            os.dup2(sock.fileno(), LISTEN_FDS_START)
        os.set_inheritable(LISTEN_FDS_START, True)  # dup2 onto itself would leave it close-on-exec
        os.environ.update(LISTEN_FDS="1", LISTEN_FDNAMES=name, LISTEN_PID=str(os.getpid()))
        setpriv = shutil.which("setpriv")
        if setpriv:
            argv = [setpriv, "--pdeathsig", "TERM", "--", *argv]
        os.execv(argv[0], argv)
    finally:
        os._exit(127)  # exec failed


def main() -> int:
    if "--" not in sys.argv[4:-1]:
        sys.exit(__doc__)
    split = sys.argv.index("--", 4)
    (address, count, name), options, argv = sys.argv[1:4], sys.argv[4:split], sys.argv[split + 1 :]
    if set(options) - {"--reuseport"}:
        sys.exit(__doc__)
    reuseport = "--reuseport" in options
    host, port = address.rsplit(":", 1)
    shared = None if reuseport else listening_socket(host, int(port), reuseport)
    pids = []
    for i in range(1, int(count) + 1):
        sock = shared or listening_socket(host, int(port), reuseport)
        pids.append(spawn(sock, name, [arg.replace("{i}", str(i)) for arg in argv]))
        if sock is not shared:
            sock.close()  # the child holds it now
    if shared is not None:
        shared.close()
    live = set(pids)

    def stop(*_: object) -> None:
        for pid in live:  # only children not yet reaped: their pids are still ours
            os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    print(json.dumps({"pids": pids}), flush=True)
    status = 0
    for pid in pids:
        _, code = os.waitpid(pid, 0)  # retried after the handler runs (PEP 475)
        live.discard(pid)
        status = status or os.waitstatus_to_exitcode(code)
    return status


if __name__ == "__main__":
    sys.exit(main())
