"""
A farm of in-process SSH proxy nodes for the many-clusters benchmark.

    python -m bench.proxyfarm --count 200 --pubkey client_ed25519.pub --out farm.json --deadline 600

Starts C{count} L{gateway.testing.FakeProxyNode} Conch servers on 127.0.0.1,
each on its own port with its own Ed25519 host key, all letting user C{root}
in with the public key of C{--pubkey}.  Once every node listens it writes
C{{"pid": PID, "nodes": [{"port": P, "host_key": "ssh-ed25519 AAAA..."}, ...]}}
to C{--out} atomically (temporary file + rename), then serves until SIGTERM
or until C{--deadline} seconds have passed, whichever comes first.

It runs in a process of its own (in the lab's controller namespace) so that
the nodes' memory and CPU are not counted as the gateway's or ssh's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from twisted.conch.ssh import keys
from twisted.internet import defer, task
from twisted.python import log as twisted_log

from gateway.testing import FakeProxyNode, generate_key, public_line

MAX_DEADLINE = 3600.0


def write_atomically(path: str, data: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


async def serve(reactor, count: int, pubkey: str, out: str, deadline: float, user: str) -> None:
    client_key = keys.Key.fromFile(pubkey)
    nodes = []
    ports = []
    for _ in range(count):
        node = FakeProxyNode(reactor, [client_key], user=user, host_key=generate_key())
        port = await node.listen("tcp:0:interface=127.0.0.1:backlog=128")
        ports.append(port)
        nodes.append({"port": port.getHost().port, "host_key": public_line(node.host_key)})
    write_atomically(out, {"pid": os.getpid(), "nodes": nodes})
    print(f"proxyfarm: {count} nodes listening, serving for at most {deadline:.0f} s", file=sys.stderr, flush=True)
    # Ends on SIGTERM (twisted's handler stops the reactor) or at the deadline.
    done = defer.Deferred()
    timer = reactor.callLater(deadline, done.callback, None)
    reactor.addSystemEventTrigger("before", "shutdown", lambda: timer.active() and timer.cancel())
    await done


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.proxyfarm")
    parser.add_argument("--count", type=int, required=True, help="number of proxy nodes (1..2000)")
    parser.add_argument("--pubkey", required=True, help="the client's public key (.pub) every node authorizes")
    parser.add_argument("--out", required=True, help="JSON file written once all nodes listen")
    parser.add_argument("--deadline", type=float, default=600.0, help="seconds to serve at most")
    parser.add_argument("--user", default="root")
    parser.add_argument("--verbose", action="store_true", help="log twisted events to stderr")
    args = parser.parse_args(argv)
    if not 1 <= args.count <= 2000:
        parser.error("--count must be between 1 and 2000")
    if not 0 < args.deadline <= MAX_DEADLINE:
        parser.error(f"--deadline must be in (0, {MAX_DEADLINE:.0f}] seconds")
    if args.verbose:
        twisted_log.startLogging(sys.stderr)

    def run(reactor):
        return defer.ensureDeferred(serve(reactor, args.count, args.pubkey, args.out, args.deadline, args.user))

    task.react(run)


if __name__ == "__main__":
    main()
