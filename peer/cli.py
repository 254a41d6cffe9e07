"""The `peer` command: `peer join` (run a daemon), `peer status` (membership table), `peer id`.

`peer join` logs what it is (peer id, listen address, coordinator), then prints one line
``READY {json}`` (peer_id, address, listen, coordinator, device, pid) on stdout once it has
joined, for scripts and tests. Everything else it says while up (role progress, per-step lines,
errors) goes through `logging` on stderr, so ``--log-format json`` gives one JSON object per
line; a failure to start is one ``peer: ...`` line on stderr, like any usage error. It exits 0
after a clean leave on SIGINT/SIGTERM, 2 when it cannot start (bad flags, a weak token, not
admitted: used invite, wrong token, an http:// coordinator off this machine without
--insecure), 1 on a fatal runtime error (this peer's identity revoked or banned).

Building the parser imports nothing heavy (no torch, aiohttp or the role plug-ins: their flags
come from light ``lowband.role_options`` modules), so `peer --help`, `peer id` and
`peer status` answer at once; each command imports what it needs when it runs.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from peer.defaults import DEFAULT_KEY_PATH, DEFAULT_LISTEN
from peer.roles import add_role_arguments, plugin_entry_points
from peer.runtime import (CommandParser, add_coordinator_args, add_logging_args,
                          read_coordinator_args, setup_logging)

if TYPE_CHECKING:
    from peer.daemon import DaemonConfig
    from peer.membership import PeerInfo

log = logging.getLogger("lowband.peer")


# -- peer join -----------------------------------------------------------------------------------
async def run_join(config: DaemonConfig) -> int:
    import asyncio
    import json

    from peer.daemon import PeerDaemon
    from peer.errors import LowbandError
    from peer.runtime import wait_for_stop_signal

    daemon = PeerDaemon(config)
    # Stop signals count from the very start: Ctrl-C while still waiting for the coordinator
    # is a clean exit too.
    stopper = asyncio.create_task(wait_for_stop_signal())
    starter = asyncio.create_task(daemon.start())
    await asyncio.wait({starter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if not starter.done():
        starter.cancel()
        await asyncio.gather(starter, return_exceptions=True)
        await daemon.stop()
        log.info("peer stopped before joining")
        return 0
    error = starter.exception()
    if error is not None:
        stopper.cancel()
        await daemon.stop()
        if not isinstance(error, LowbandError):
            raise error
        print(f"peer: {error}", file=sys.stderr, flush=True)  # like any usage error: one line
        return 2
    assert daemon.host is not None
    log.info("peer id: %s", daemon.peer_id)
    log.info("listening on %s, announced as %s", daemon.host.address, daemon.address)
    log.info("coordinator: %s (heartbeat every %gs)", config.coordinator, daemon.heartbeat_interval)
    log.info("device: %s, roles: %s", daemon.device, ", ".join(sorted(config.roles)) or "none")
    if daemon.metrics_url:
        log.info("metrics: %s", daemon.metrics_url)
    print("READY " + json.dumps({"peer_id": daemon.peer_id, "address": daemon.address,
                                 "listen": daemon.host.address, "coordinator": config.coordinator,
                                 "device": daemon.device, "metrics_url": daemon.metrics_url,
                                 "pid": os.getpid()}), flush=True)
    runner = asyncio.create_task(daemon.run())
    await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if runner.done():
        code = 1
        log.error("%s", runner.exception() or "daemon stopped unexpectedly")
    for task in (runner, stopper):
        task.cancel()
    await asyncio.gather(runner, stopper, return_exceptions=True)
    await daemon.stop()
    log.info("peer stopped")
    return code


# -- peer status ---------------------------------------------------------------------------------
def _human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"


def _median_ping_ms(p: PeerInfo) -> str:
    rtts = sorted(row["ping_rtt_s"] for row in p.stats.get("links", {}).values()
                  if isinstance(row, dict) and isinstance(row.get("ping_rtt_s"), (int, float)))
    return f"{rtts[len(rtts) // 2] * 1e3:.2f}" if rtts else "-"


def format_table(peers: list[PeerInfo]) -> str:
    """The membership table `peer status` prints (one row per peer, states included)."""
    header = ("PEER", "ADDRESS", "STATE", "ROLES", "DEVICE", "MEMORY", "HB AGE", "GFLOP/S",
              "LINKS", "PING MS")
    rows = [header]
    for p in peers:
        links = p.stats.get("links", {}) if isinstance(p.stats, dict) else {}
        rows.append((p.peer_id[:12], p.address or "hidden", p.state, ",".join(p.roles) or "-",
                     p.device or "-", _human_bytes(p.memory),
                     "-" if p.heartbeat_age_s is None else f"{p.heartbeat_age_s:.1f}s",
                     "-" if p.throughput is None else f"{p.throughput / 1e9:.1f}",
                     str(len(links)), _median_ping_ms(p)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def run_status(args: argparse.Namespace) -> int:
    import json
    import time

    from peer.identity import Identity
    from peer.membership import CoordinatorError, PeerInfo, read_status

    try:
        where = read_coordinator_args(args)
        if args.key is not None and not args.key.expanduser().is_file():
            raise ValueError(f"no identity key at {args.key}")
        identity = Identity.load_or_create(args.key) if args.key is not None else None
        status = read_status(where["coordinator"], identity, join=where["join"],
                             insecure=where["insecure"])
        url = where["coordinator"] or status.get("coordinator") or "coordinator"
    except (OSError, ValueError) as e:
        print(f"peer: {e}", file=sys.stderr)
        return 2
    except CoordinatorError as e:
        print(f"peer: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    peers = [PeerInfo.from_dict(p) for p in status.get("peers", [])]
    counts = status.get("counts", {})
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no peers"
    print(f"coordinator {url}: {summary} (at {time.strftime('%H:%M:%S')})")
    print(format_table(peers))
    return 0


# -- argument parsing ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="peer", description="lowband peer: join a swarm, inspect membership, show identity.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    join = sub.add_parser(
        "join", help="run a peer daemon until SIGINT/SIGTERM",
        description="Register with the coordinator, heartbeat, accept encrypted peer connections, "
                    "keep a mesh view of live peers and ping them (RTT in the stats), rejoin when "
                    "the coordinator comes back, leave cleanly on SIGINT/SIGTERM. Prints "
                    "'READY {json}' once joined.",
        epilog="Admission: --join STRING (an invite from `coordinator invite`), --token (a closed "
               "swarm's token) or neither (a coordinator started with --open); the credential is "
               "kept next to the key (KEY.cred). Exit status: 0 after a clean stop "
               "(SIGINT/SIGTERM), 2 when it cannot start (not admitted: used invite, wrong token; "
               "bad flags, missing role plug-in, port in use), 1 on a fatal error while running "
               "(this peer's identity revoked, banned).")
    add_coordinator_args(join)
    join.add_argument("--listen", default=DEFAULT_LISTEN,
                      help="HOST:PORT for peer connections (port 0 = any)")
    join.add_argument("--announce", help="HOST:PORT other peers dial (default: the listen address; "
                                         "for 0.0.0.0 the IP the coordinator sees us at, with the "
                                         "listen port). The coordinator dials it back; behind a NAT "
                                         "that fails and peers reach us through relays")
    join.add_argument("--no-relay", dest="relay", action="store_false",
                      help="do not relay traffic for peers behind NATs (reachable peers relay by "
                           "default: the end-to-end encryption passes through unread)")
    join.add_argument("--relay-rate", type=float, metavar="MBIT",
                      help="cap all relayed traffic at MBIT Mbit/s (default: uncapped)")
    join.add_argument("--key", type=Path, default=DEFAULT_KEY_PATH,
                      help="Ed25519 identity key file, created if missing")
    join.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                      help="compute device reported to the swarm (auto: cuda if torch sees one)")
    join.add_argument("--ping-interval", type=float, default=2.0,
                      help="seconds between RTT pings to each live peer")
    join.add_argument("--metrics-port", type=int, metavar="PORT",
                      help="serve Prometheus GET /metrics on the --listen host at PORT (0: any free "
                           "port, shown in the READY line; default: no metrics server)")
    add_logging_args(join)
    roles = join.add_argument_group("roles (plug-ins of entry-point group lowband.roles)")
    roles.add_argument("--train", metavar="RUN", help="also train in run RUN (default: no training)")
    roles.add_argument("--serve", metavar="MODEL",
                       help="also serve MODEL[,tp=GROUP:RANK/K][@A:B|@N] (default: no serving)")
    serve = join.add_argument_group("serve role (needs --serve MODEL)")
    serve.add_argument("--blocks", metavar="A:B",
                       help="serve blocks A..B-1 (default: where the swarm has the least coverage)")
    parser.set_defaults(role_actions=add_role_arguments(join))

    status = sub.add_parser("status", help="print the coordinator's membership table",
                            description="Print every peer the coordinator knows: state, address, "
                                        "roles, device, memory, heartbeat age, throughput, links.")
    add_coordinator_args(status, token=False)
    status.add_argument("--key", type=Path,
                        help="sign the request with this identity key: an admitted operator sees "
                             "every peer's address and stats (default: the public view)")
    status.add_argument("--json", action="store_true", help="print the raw /api/status JSON")

    ident = sub.add_parser("id", help="print this peer's id (creates the key if missing)",
                           description="Print the peer id (hex sha256 prefix of the public key).")
    ident.add_argument("--key", type=Path, default=DEFAULT_KEY_PATH, help="identity key file")
    add_plugin_commands(sub)
    return parser


COMMANDS_GROUP = "lowband.commands"


def add_plugin_commands(sub) -> None:
    """Subcommands from installed plug-ins (entry-point group ``lowband.commands``): each entry
    point is ``fn(subparsers)`` adding its parser with ``set_defaults(run=fn(args) -> int)``, so
    peer/ never imports the packages that implement them (``peer generate``, ``peer gateway``)."""
    for ep in plugin_entry_points(COMMANDS_GROUP):
        try:
            ep.load()(sub)
        except Exception as e:  # a broken plug-in must not take `peer join/status` down with it
            print(f"peer: skipping command plug-in {ep.name!r} ({ep.value}): {type(e).__name__}: {e}",
                  file=sys.stderr)


def _omp_wait_policy(argv: list[str]) -> None:
    """How a serving peer's idle OpenMP workers wait, read by the OpenMP runtime when torch loads,
    so set in the environment before anything imports torch (decided from the raw arguments;
    values the user set win). Training peers keep the runtime's default.

    A pipeline stage spins briefly (about 2 ms here) before sleeping: a forward is a few hundred
    short parallel ops, and waking sleeping workers for each one cost batch-8 stages 15% (3-stage
    loopback pipeline on 2 cores: servers' compute 95 -> 83 ms per step, the same blocks in one
    process 81 ms), while a short spin leaves the core to co-located stages between forwards
    (the runtime's default spin, ~15 ms, made batch 1 70 ms per token instead of 58). A tensor
    split's peers compute at the same time and wait on each other inside a forward: spinning
    there takes cores that co-located group members need (batch 8: 202 -> 241 ms), so they sleep."""
    serve = None
    for i, arg in enumerate(argv):
        if arg.startswith("--serve="):
            serve = arg.split("=", 1)[1]
        elif arg == "--serve" and i + 1 < len(argv):
            serve = argv[i + 1]
    if serve is None:
        return
    if ",tp=" in serve:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    elif "OMP_WAIT_POLICY" not in os.environ:
        os.environ.update(OMP_WAIT_POLICY="ACTIVE", GOMP_SPINCOUNT=os.environ.get("GOMP_SPINCOUNT", "20000"))


def role_flag_errors(args: argparse.Namespace, roles: dict[str, str]) -> list[str]:
    """Role options given without their role (``--inner-steps`` without ``--train``): an error,
    as silently ignoring them would train or serve with other settings than asked for."""
    errors = []
    for name, actions in sorted(args.role_actions.items()):
        given = [a.option_strings[0] for a in actions if getattr(args, a.dest) is not None]
        if given and name not in roles:
            errors.append(f"{', '.join(given)} {'is a' if len(given) == 1 else 'are'} {name} role "
                          f"option{'s' if len(given) > 1 else ''}; add --{name}")
    if args.blocks and "serve" not in roles:
        errors.append("--blocks is a serve role option; add --serve MODEL")
    return errors


def main(argv: list[str] | None = None) -> int:
    _omp_wait_policy(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "id":
        from peer.identity import Identity

        try:
            print(Identity.load_or_create(args.key).peer_id)
        except (OSError, ValueError) as e:
            print(f"peer: cannot load or create key {args.key}: {e}", file=sys.stderr)
            return 2
        return 0
    if getattr(args, "run", None) is not None:
        return args.run(args)
    if args.command == "status":
        return run_status(args)
    roles = {name: value for name, value in (("train", args.train), ("serve", args.serve)) if value}
    errors = role_flag_errors(args, roles)
    if errors:
        print("\n".join(f"peer join: error: {e}" for e in errors), file=sys.stderr)
        return 2
    setup_logging(args.log_format, args.log_level)
    if args.blocks:
        roles["serve"] += "@" + args.blocks
    role_options = {name: {a.dest: getattr(args, a.dest) for a in args.role_actions[name]}
                    for name in roles if name in args.role_actions}
    from peer.daemon import DaemonConfig, DaemonError
    from peer.transport import install_event_loop_policy

    try:
        config = DaemonConfig(**read_coordinator_args(args), listen=args.listen,
                              announce=args.announce, key_path=args.key, device=args.device,
                              roles=roles, ping_interval=args.ping_interval,
                              role_options=role_options, metrics_port=args.metrics_port,
                              relay=args.relay, relay_rate=None if args.relay_rate is None
                              else args.relay_rate * 1e6 / 8)
    except (DaemonError, ValueError) as e:
        print(f"peer: {e}", file=sys.stderr)
        return 2
    install_event_loop_policy()  # uvloop where installed; plain asyncio otherwise
    import asyncio

    return asyncio.run(run_join(config))


if __name__ == "__main__":
    raise SystemExit(main())
