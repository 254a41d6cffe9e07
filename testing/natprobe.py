"""Plain-TCP probes for NAT topologies (testing.nat): what a router lets through, shown with real
sockets and no product code -- the ground truth that reversal and hole punching are built against.

Run inside a namespace as ``python natprobe.py MODE ...`` (stdlib only, so the file runs without
the package on the path); every result is one JSON line on stdout.

* ``serve HOST``: listen on HOST:0, print ``{"port": p}``; answer every connection with the
  address:port it came from (``"ip port\\n"``, like a STUN server over TCP) and print
  ``{"peer": [ip, port]}``.
* ``dial BIND_HOST HOST PORT [BIND_PORT]``: connect (3 s timeout) from BIND_HOST:BIND_PORT, read
  the observed address; prints ``{"ok": true, "local": [...], "observed": [ip, port]}`` or
  ``{"ok": false, "error": "..."}``.
* ``hold`` (same arguments): as dial, then keeps the connection open until stdin closes.
* ``punch HOST OBSERVER_HOST OBSERVER_PORT``: TCP simultaneous open. Listens on HOST:0, learns
  its observed address from the observer *from the listening port*, prints
  ``{"port": p, "ok": .., "observed": [ip, port]}``, then reads one JSON plan line from stdin:
  ``{"peer": [ip, port], "at": unix_time, "timeout": s, "hello": text, "retry": bool}``. At
  ``at`` it connects from its listening port to the peer's observed address (SO_REUSEPORT),
  retrying on a refusal (retry=true) until the timeout, and also accepts on the listener in case
  the peer's SYN lands there. On success both sides exchange ``hello`` lines; prints
  ``{"ok": true, "via": "connect"|"accept", "attempts": n, "errors": [...], "peer": [...],
  "got": peer's hello, "seconds": from ``at`` to connected}`` or ``{"ok": false, "attempts": n, "errors": [...]}``.
"""
from __future__ import annotations

import errno
import json
import select
import socket
import sys
import time

_DIAL_TIMEOUT_S = 3.0
_RETRY_PAUSE_S = 0.1


def argv(mode: str, *args: object) -> list[str]:
    """The command line that runs this probe (pass to NatLab.popen / NatLab.run)."""
    return [sys.executable, __file__, mode, *map(str, args)]


def _out(**fields) -> None:
    print(json.dumps(fields), flush=True)


def _socket(host: str, port: int) -> socket.socket:
    # SO_REUSEPORT lets connecting sockets share the listener's port; SO_REUSEADDR lets them
    # rebind while an earlier connection from that port sits in TIME_WAIT.
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, port))
    return s


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def dial(bind_host: str, host: str, port: int, bind_port: int = 0, *, hold: bool = False) -> dict:
    """Connect and read the observed address. hold: print the result, then keep the connection
    (and so its NAT mapping) open until stdin closes."""
    s = _socket(bind_host, bind_port)
    s.settimeout(_DIAL_TIMEOUT_S)
    try:
        s.connect((host, port))
        words = s.makefile().readline().split()
        result = {"ok": True, "local": list(s.getsockname()), "observed": [words[0], int(words[1])]}
    except (OSError, IndexError, ValueError) as exc:
        result = {"ok": False, "error": _error(exc)}
    if hold:
        _out(**result)
        sys.stdin.read()
    s.close()
    return result


def serve(host: str) -> None:
    server = _socket(host, 0)
    server.listen(64)
    _out(port=server.getsockname()[1])
    while True:
        conn, peer = server.accept()
        _out(peer=[peer[0], peer[1]])
        try:
            conn.sendall(f"{peer[0]} {peer[1]}\n".encode())
        except OSError:
            pass
        conn.close()


def punch(host: str, observer: str, observer_port: int) -> None:
    listener = _socket(host, 0)
    listener.listen(4)
    port = listener.getsockname()[1]
    _out(port=port, **dial(host, observer, observer_port, port))
    plan = json.loads(sys.stdin.readline())
    target = (plan["peer"][0], int(plan["peer"][1]))
    time.sleep(max(0.0, plan["at"] - time.time()))
    deadline = time.monotonic() + plan["timeout"]
    attempts, errors, conn, via, sock = 0, [], None, None, None
    while conn is None and time.monotonic() < deadline:
        if sock is None:
            sock = _socket(host, port)
            sock.setblocking(False)
            attempts += 1
            rc = sock.connect_ex(target)
            if rc not in (0, errno.EINPROGRESS):
                errors.append(errno.errorcode.get(rc, str(rc)))
                sock.close()
                sock = None
                time.sleep(_RETRY_PAUSE_S)
                continue
        readable, writable, _ = select.select([listener], [sock], [], max(0.0, min(0.2, deadline - time.monotonic())))
        if readable:
            conn, _ = listener.accept()
            via = "accept"
        elif writable:
            rc = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if rc == 0:
                conn, via = sock, "connect"
                continue
            errors.append(errno.errorcode.get(rc, str(rc)))
            sock.close()
            sock = None
            if not plan.get("retry", True):
                break
            time.sleep(_RETRY_PAUSE_S)
    if conn is None:
        _out(ok=False, attempts=attempts, errors=errors)
        return
    connected_at = time.time()
    conn.setblocking(True)
    conn.settimeout(_DIAL_TIMEOUT_S)
    try:
        conn.sendall(plan["hello"].encode() + b"\n")
        got = conn.makefile().readline().strip()
    except OSError as exc:
        _out(ok=False, attempts=attempts, errors=[*errors, _error(exc)])
        return
    _out(ok=True, via=via, attempts=attempts, errors=errors, peer=list(conn.getpeername()), got=got,
         seconds=round(connected_at - plan["at"], 4))


def main(args: list[str]) -> None:
    mode, rest = args[0], args[1:]
    if mode == "serve":
        serve(rest[0])
    elif mode in ("dial", "hold"):
        result = dial(rest[0], rest[1], int(rest[2]), int(rest[3]) if len(rest) > 3 else 0, hold=mode == "hold")
        if mode == "dial":
            _out(**result)
    elif mode == "punch":
        punch(rest[0], rest[1], int(rest[2]))
    else:
        raise SystemExit(f"unknown mode {mode!r}: serve, dial, hold or punch")


if __name__ == "__main__":
    main(sys.argv[1:])
