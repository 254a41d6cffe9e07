"""`coordinator start`: run the membership coordinator (HTTP JSON API + status page).

Logs what it serves (address, status page, data dir, checkpoint store, token source), then prints
one machine-readable line ``READY {json}`` (url, host, port, data_dir, pid) on stdout once it is
listening; everything else goes through `logging` on stderr (``--log-format json``: one JSON
object per line), except a failure to start (exit 2), which is one ``coordinator: ...`` line on
stderr like any usage error. SIGINT/SIGTERM stop it cleanly (exit 0).

`coordinator ban PEER_ID` / `coordinator unban PEER_ID` write to the database under the data dir
directly (the operator's access to that dir is the authority; every peer holds the swarm token,
so no HTTP route may ban). A running coordinator reads bans on every request, so they hold at once.

Building the parser imports nothing heavy (aiohttp, the app, the store load when a command runs),
so `coordinator --help` answers at once.
"""
from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from coordinator.defaults import DEFAULT_BAN_AFTER, DEFAULT_DATA_DIR, DEFAULT_GRACE_S, DEFAULT_PORT
from peer.runtime import CommandParser, add_logging_args, add_token_args, read_token, setup_logging

if TYPE_CHECKING:
    from coordinator.app import CoordinatorConfig

log = logging.getLogger("lowband.coordinator")


def resolve_token(args: argparse.Namespace, data_dir: Path) -> tuple[str, str]:
    """The swarm token and where it came from: --token, --token-file, $LOWBAND_TOKEN, or a
    random one generated once and kept in <data-dir>/token (mode 0600) so restarts reuse it."""
    token = read_token(args.token, args.token_file)
    if token:
        return token, "--token" if args.token else args.token_file or "$LOWBAND_TOKEN"
    if args.token_file:
        raise SystemExit(f"coordinator: token file {args.token_file} is empty")
    path = data_dir / "token"
    try:
        if path.exists():
            return path.read_text().strip(), str(path)
        data_dir.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(24)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return token, f"{path} (generated)"
    except OSError as e:
        raise SystemExit(f"coordinator: cannot use token file {path}: {e.strerror}")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="coordinator",
        description="lowband coordinator: membership registry (join/heartbeat/leave, failure "
                    "detection), JSON API under /api and a status page at /. State lives in "
                    "SQLite under the data dir, so a restart (even after kill -9) loses nothing.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    start = sub.add_parser("start", help="run the coordinator until SIGINT/SIGTERM",
                           description="Run the coordinator. Prints 'READY {json}' when listening.")
    start.add_argument("--host", default="127.0.0.1",
                       help="address to bind (0.0.0.0 for all interfaces)")
    start.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (0 picks a free one)")
    start.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                       help="directory for the SQLite database and token")
    add_token_args(start.add_mutually_exclusive_group(),
                   "$LOWBAND_TOKEN, else <data-dir>/token, generated once")
    start.add_argument("--heartbeat-interval", type=float, default=2.0,
                       help="seconds between peer heartbeats, told to peers")
    start.add_argument("--peer-timeout", type=float, default=10.0,
                       help="a peer silent this long is dead, half as long suspect")
    start.add_argument("--max-clock-skew", type=float, default=300.0,
                       help="accepted clock difference on signed peer requests, seconds")
    start.add_argument("--peer-rate", type=float, default=50.0, metavar="PER_S",
                       help="signed requests per second per peer id, bursts of 4x that; more get "
                            "HTTP 429")
    start.add_argument("--address-rate", type=float, default=200.0, metavar="PER_S",
                       help="other requests per second per remote address, bursts of 5x that")
    start.add_argument("--max-peers", type=int, default=10_000,
                       help="live peers accepted; joins beyond it get HTTP 429")
    start.add_argument("--ban-after", type=int, default=DEFAULT_BAN_AFTER, metavar="N",
                       help="ban a peer once N distinct peers reported it for poisoned updates "
                            "(robust training runs); 0: only 'coordinator ban'")
    ckpt = start.add_argument_group("checkpoint store")
    ckpt.add_argument("--checkpoint-store", metavar="s3://BUCKET[/PREFIX]",
                      help="keep checkpoints in an S3-compatible bucket (needs the 's3' extra; "
                           "credentials from the usual AWS env vars / config files; default: "
                           "<data-dir>/checkpoints)")
    ckpt.add_argument("--endpoint-url", help="S3 endpoint for MinIO, moto, ... (default: AWS)")
    ckpt.add_argument("--keep-last", type=int, default=5, metavar="N",
                      help="after each commit keep the N newest checkpoints of the run, delete "
                           "older ones (0 keeps every checkpoint)")
    ckpt.add_argument("--keep-every", type=int, metavar="M",
                      help="also keep every checkpoint whose step is a multiple of M (default: none)")
    ckpt.add_argument("--gc-grace", type=float, default=DEFAULT_GRACE_S, metavar="SECONDS",
                      help="unreferenced chunks younger than this are kept, as an upload may "
                           "still need them")
    add_logging_args(start)
    add_checkpoint_commands(sub)
    add_ban_commands(sub)
    return parser


def add_ban_commands(sub: argparse._SubParsersAction) -> None:
    ban = sub.add_parser("ban", help="ban a peer: it leaves at once and is refused from then on",
                         description="Ban a peer id (its joins, heartbeats and run requests get "
                                     "HTTP 403). Works on a running coordinator's data dir.")
    ban.add_argument("peer", metavar="PEER_ID", help="peer id, or a unique prefix of a known one")
    ban.add_argument("--reason", default="banned by the operator", help="shown to the peer")
    unban = sub.add_parser("unban", help="lift a ban (and forget the peer's offense reports)")
    unban.add_argument("peer", metavar="PEER_ID", help="peer id, or a unique prefix of a banned one")
    for p in (ban, unban):
        p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="coordinator data dir")


def _resolve_peer(conn, text: str) -> str:
    """A full peer id as given, or the one known peer id (peers, bans, offense reports) that
    starts with ``text``."""
    text = text.lower()
    if len(text) == 40 and all(c in "0123456789abcdef" for c in text):
        return text
    if not 4 <= len(text) < 40 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(f"{text!r} is neither a peer id (40 hex digits) nor a prefix of one")
    known = {r[0] for table in ("peers", "bans", "offenses")
             for r in conn.execute(f"SELECT peer_id FROM {table} WHERE peer_id LIKE ?", (text + "%",))}
    if len(known) != 1:
        raise ValueError(f"prefix {text!r} matches {len(known)} known peers; give more of the id")
    return known.pop()


def run_ban(args: argparse.Namespace) -> int:
    """`coordinator ban|unban PEER_ID`: errors -> exit 1."""
    import asyncio
    import time

    from coordinator.offenses import OFFENSES_MIGRATIONS, forget_reports
    from coordinator.registry import MEMBERSHIP_MIGRATIONS, ban_peer, unban_peer
    from coordinator.store import DB_NAME, Store, StoreError

    if not (args.data_dir / DB_NAME).is_file():
        print(f"coordinator: no coordinator database in {args.data_dir}; pass its --data-dir",
              file=sys.stderr)
        return 1
    store = Store(args.data_dir)
    try:
        store.open()
        store.apply_schema("membership", MEMBERSHIP_MIGRATIONS)
        store.apply_schema("offenses", OFFENSES_MIGRATIONS)

        def change(conn) -> str:
            peer = _resolve_peer(conn, args.peer)
            now = time.time()
            if args.command == "ban":
                done = ban_peer(conn, peer, args.reason[:300], "operator", now)
                return f"banned {peer}" if done else f"{peer} was banned already"
            if not unban_peer(conn, peer, now):
                raise ValueError(f"{peer} is not banned")
            return f"unbanned {peer} (forgot {forget_reports(conn, peer)} offense reports)"
        print(asyncio.run(store.run(change)))
        return 0
    except (StoreError, ValueError) as e:
        print(f"coordinator: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()


def add_checkpoint_commands(sub: argparse._SubParsersAction) -> None:
    ckpt = sub.add_parser("checkpoints", help="list or export stored checkpoints",
                          description="Inspect the checkpoint store under the data dir (or S3).")
    ckpt_sub = ckpt.add_subparsers(dest="checkpoints_command", required=True)
    listing = ckpt_sub.add_parser("list", help="one line per checkpoint: run, step, size, hash")
    listing.add_argument("run", nargs="?", help="only this run (default: every run)")
    export = ckpt_sub.add_parser("export", help="write a checkpoint as HF safetensors + config.json")
    export.add_argument("step", help="step number or 'latest'")
    export.add_argument("out", type=Path, help="output directory")
    export.add_argument("--run", help="run name (default: the only run in the store)")
    for p in (listing, export):
        p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="coordinator data dir")
        p.add_argument("--s3", metavar="s3://BUCKET[/PREFIX]",
                       help="read from S3 instead of the data dir (default: the data dir)")
        p.add_argument("--endpoint-url", help="S3 endpoint (MinIO, moto, ...; default: AWS)")
        add_logging_args(p)  # export reads every chunk: progress goes to the log


def run_checkpoints(args: argparse.Namespace) -> int:
    """`coordinator checkpoints list|export`: print the library's text; errors -> exit 1."""
    from coordinator.checkpoints import CheckpointError, cli_export, cli_list, list_runs, open_backend

    try:
        if args.checkpoints_command == "list":
            print(cli_list(args.data_dir, args.run, s3_url=args.s3, endpoint_url=args.endpoint_url))
            return 0
        run = args.run
        if run is None:
            runs = list_runs(open_backend(args.data_dir, args.s3, args.endpoint_url))
            if len(runs) != 1:
                print(f"coordinator: pass --run; the store holds runs {runs or 'none'}", file=sys.stderr)
                return 1
            run = runs[0]
        print(cli_export(args.data_dir, run, args.step, args.out, s3_url=args.s3,
                         endpoint_url=args.endpoint_url))
        return 0
    except (CheckpointError, OSError) as e:
        print(f"coordinator: {e}", file=sys.stderr)
        return 1


async def serve(config: CoordinatorConfig, token_source: str) -> int:
    import asyncio
    import json

    from aiohttp import web

    from coordinator.app import create_app
    from coordinator.checkpoints import CheckpointError, open_backend
    from coordinator.store import Store, StoreError
    from peer.runtime import wait_for_stop_signal

    try:  # a misconfigured bucket must stop the start, not fail the first upload an hour later
        backend = open_backend(config.data_dir, config.checkpoint_store, config.s3_endpoint_url)
        await asyncio.to_thread(backend.check)
    except (CheckpointError, OSError) as e:
        print(f"coordinator: checkpoint store: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    store = Store(config.data_dir)
    try:
        store.open()
    except StoreError as e:
        print(f"coordinator: {e}", file=sys.stderr)
        return 2
    runner = web.AppRunner(create_app(config, store, backend), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
    except OSError as e:
        print(f"coordinator: cannot listen on {config.host}:{config.port}: {e.strerror or e}",
              file=sys.stderr)
        await runner.cleanup()
        store.close()
        return 2
    port = runner.addresses[0][1]
    shown_host = "127.0.0.1" if config.host in ("0.0.0.0", "") else config.host
    url = f"http://{shown_host}:{port}"
    log.info("coordinator listening on %s:%s", config.host, port)
    log.info("status page: %s/", url)
    log.info("data dir: %s", config.data_dir)
    keep = config.retention
    log.info("checkpoints: %s (%s%s)", backend,
             f"keep last {keep.keep_last}" if keep.keep_last else "keep all",
             f", every step divisible by {keep.keep_every}" if keep.keep_every else "")
    log.info("swarm token: %s", token_source)
    print("READY " + json.dumps({"url": url, "host": config.host, "port": port,
                                 "data_dir": str(config.data_dir), "pid": os.getpid()}), flush=True)
    try:
        await wait_for_stop_signal()
    finally:
        await runner.cleanup()
        store.close()
    log.info("coordinator stopped")
    return 0


def _quiet_libraries(level: str) -> None:
    if level == "debug":
        return
    # aiohttp logs every malformed request (scanners, fuzzers) with a traceback at ERROR;
    # it already answers 400, and handler errors are logged by the app's middleware.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("botocore").setLevel(logging.WARNING)  # "Found credentials in ..." per client


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "checkpoints":
        setup_logging(args.log_format, args.log_level)
        _quiet_libraries(args.log_level)
        return run_checkpoints(args)
    if args.command in ("ban", "unban"):
        return run_ban(args)
    import asyncio

    from coordinator.app import CoordinatorConfig
    from coordinator.checkpoint_routes import RetentionPolicy
    from peer.transport import install_event_loop_policy

    setup_logging(args.log_format, args.log_level)
    _quiet_libraries(args.log_level)
    token, source = resolve_token(args, args.data_dir)
    try:
        config = CoordinatorConfig(data_dir=args.data_dir, token=token, host=args.host,
                                   port=args.port, heartbeat_interval=args.heartbeat_interval,
                                   peer_timeout=args.peer_timeout,
                                   max_clock_skew=args.max_clock_skew,
                                   peer_rate_per_s=args.peer_rate,
                                   peer_burst=max(1, round(4 * args.peer_rate)),
                                   address_rate_per_s=args.address_rate,
                                   address_burst=max(1, round(5 * args.address_rate)),
                                   max_peers=args.max_peers, ban_after=args.ban_after,
                                   checkpoint_store=args.checkpoint_store,
                                   s3_endpoint_url=args.endpoint_url,
                                   retention=RetentionPolicy(args.keep_last or None, args.keep_every,
                                                             args.gc_grace))
    except ValueError as e:
        print(f"coordinator: {e}", file=sys.stderr)
        return 2
    install_event_loop_policy()  # uvloop where installed: cheaper request handling at scale
    return asyncio.run(serve(config, source))
