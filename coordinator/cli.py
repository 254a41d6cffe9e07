"""`coordinator start`: run the membership coordinator (HTTP(S) JSON API + status page); and the
operator's offline commands on its data dir: `invite`, `join-string`, `credentials`, `revoke`,
`ban`/`unban`, `checkpoints`, `token`.

Admission (coordinator/auth.py): by invite always; by the swarm token with ``--token`` (closed
swarm; the token must have >= 128 bits, `coordinator token` makes one); by anyone with ``--open``.
HTTPS with ``--tls-cert/--tls-key``, or a self-signed certificate generated once in the data dir
(``--tls self-signed``, the default when binding a non-loopback address); its fingerprint goes
into join strings. Plain HTTP on a non-loopback address needs ``--insecure``.

Logs what it serves (address, status page, data dir, checkpoint store, admission), writes
``<data_dir>/endpoint.json`` (url, TLS fingerprint, authority key: what `invite` puts in join
strings), then prints one machine-readable line ``READY {json}`` (url, host, port, data_dir, pid,
fingerprint, authority) on stdout once it is listening; everything else goes through `logging` on
stderr (``--log-format json``: one JSON object per line), except a failure to start (exit 2), which is one ``coordinator: ...`` line on
stderr like any usage error. SIGINT/SIGTERM stop it cleanly (exit 0).

`coordinator ban|unban|invite|revoke` write to the database under the data dir directly (the
operator's access to that dir is the authority, so no HTTP route needs an operator secret). A
running coordinator reads bans on every request and revocations within a second.

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

from coordinator.defaults import (DEFAULT_ADMIT_RATE, DEFAULT_BAN_AFTER, DEFAULT_CHECKPOINT_QUOTA_BYTES,
                                  DEFAULT_CREDENTIAL_LIFETIME_S,
                                  DEFAULT_DATA_DIR, DEFAULT_GRACE_S, DEFAULT_MAX_CLOCK_SKEW_S,
                                  DEFAULT_MAX_PEERS_PER_ADDRESS, DEFAULT_PORT)
from peer.runtime import CommandParser, add_logging_args, add_token_args, read_token, setup_logging

if TYPE_CHECKING:
    from coordinator.app import CoordinatorConfig

log = logging.getLogger("lowband.coordinator")


def resolve_token(args: argparse.Namespace) -> tuple[str | None, str]:
    """The swarm token (closed swarm) and where it came from: --token, --token-file,
    $LOWBAND_TOKEN; None: no token admission (invites, or --open)."""
    token = read_token(args.token, args.token_file)
    if args.token_file and not token:
        raise SystemExit(f"coordinator: token file {args.token_file} is empty")
    if not token:
        return None, "none (admission by invite" + (" or open)" if args.open else ")")
    return token, "--token" if args.token else args.token_file or "$LOWBAND_TOKEN"


ROLE_CHOICES = ("train", "serve", "client", "operator")
ENDPOINT_FILE = "endpoint.json"  # written by `start`: url, TLS fingerprint, authority key
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """'90', '90s', '30m', '12h', '7d' -> seconds (argparse type)."""
    text = text.strip().lower()
    unit = DURATION_UNITS.get(text[-1:], None)
    try:
        value = float(text[:-1] if unit else text) * (unit or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 3600, 30m, 12h, 7d)") from None
    if not 0 < value < 10 * 365 * 86400:
        raise argparse.ArgumentTypeError(f"duration {text!r} must be positive and under 10 years")
    return value


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
                       help="directory for the SQLite database, the authority key and TLS files")
    admit = start.add_argument_group(
        "admission", "Peers are admitted under their own keys: by invite (`coordinator invite`), "
                     "always; by proof of the swarm token with --token (closed swarm); by anyone "
                     "with --open. No request ever carries the token.")
    add_token_args(admit.add_mutually_exclusive_group(),
                   "$LOWBAND_TOKEN, else no token admission")
    admit.add_argument("--open", action="store_true",
                       help="open swarm: any key is admitted with roles train, serve, client "
                            "(admissions are rate-limited per address)")
    admit.add_argument("--credential-lifetime", type=duration, default=DEFAULT_CREDENTIAL_LIFETIME_S,
                       metavar="DURATION",
                       help="how long an issued credential is valid (peers renew it); e.g. 12h, 1d")
    admit.add_argument("--admit-rate", type=float, default=DEFAULT_ADMIT_RATE, metavar="PER_S",
                       help="admissions per second per address, bursts of 40x that")
    tls = start.add_argument_group("TLS")
    tls.add_argument("--tls", choices=("auto", "self-signed", "off"), default="auto",
                     help="auto: self-signed unless binding loopback (or --tls-cert given); "
                          "self-signed: make one in the data dir once, its fingerprint goes into "
                          "join strings; off: plain HTTP (needs --insecure off loopback)")
    tls.add_argument("--tls-cert", type=Path, metavar="PEM",
                     help="certificate chain to serve HTTPS with (with --tls-key; default: per --tls)")
    tls.add_argument("--tls-key", type=Path, metavar="PEM",
                     help="private key of --tls-cert (default: none, per --tls)")
    tls.add_argument("--insecure", action="store_true",
                     help="allow plain HTTP on a non-loopback address (signed requests still "
                          "cannot be replayed, but bodies travel in clear)")
    start.add_argument("--public-url", metavar="URL",
                       help="URL peers use to reach this coordinator (put into join strings; "
                            "default: from --host/--port)")
    start.add_argument("--heartbeat-interval", type=float, default=2.0,
                       help="seconds between peer heartbeats, told to peers")
    start.add_argument("--peer-timeout", type=float, default=10.0,
                       help="a peer silent this long is dead, half as long suspect")
    start.add_argument("--max-clock-skew", type=float, default=DEFAULT_MAX_CLOCK_SKEW_S,
                       help="accepted clock difference on signed requests, seconds (the replay "
                            "guard remembers nonces this long)")
    start.add_argument("--peer-rate", type=float, default=50.0, metavar="PER_S",
                       help="requests per second per identity, bursts of 4x that; more get "
                            "HTTP 429")
    start.add_argument("--address-rate", type=float, default=200.0, metavar="PER_S",
                       help="requests per second per remote address (signed or not), bursts of "
                            "5x that")
    start.add_argument("--max-peers", type=int, default=10_000,
                       help="live peers accepted; joins beyond it get HTTP 429")
    start.add_argument("--max-peers-per-address", type=int, default=DEFAULT_MAX_PEERS_PER_ADDRESS,
                       metavar="N",
                       help="live peers joined from one remote address (0: no cap)")
    start.add_argument("--no-probe", action="store_true",
                       help="do not dial back joiners to verify their announced address (peers "
                            "then treat every address as unverified)")
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
    ckpt.add_argument("--checkpoint-quota", type=int, default=DEFAULT_CHECKPOINT_QUOTA_BYTES,
                      metavar="BYTES", help="disk for one run's checkpoint chunks; uploads beyond "
                                            "it are refused (0: no quota)")
    ckpt.add_argument("--pending-quota", type=int, metavar="BYTES",
                      help="chunks one uploader may hold that no published checkpoint references "
                           "yet (default: half the --checkpoint-quota)")
    add_logging_args(start)
    add_checkpoint_commands(sub)
    add_ban_commands(sub)
    add_admission_commands(sub)
    return parser


def add_admission_commands(sub: argparse._SubParsersAction) -> None:
    invite = sub.add_parser(
        "invite", help="print a join string that admits one new peer or client",
        description="Create an invite and print its join string (lowband1:...). A peer redeems it "
                    "with `peer join --join STRING`; it carries the coordinator URL, its authority "
                    "key and TLS fingerprint, and the invite secret. Works on a running "
                    "coordinator's data dir.")
    invite.add_argument("--role", action="append", required=True, choices=sorted(ROLE_CHOICES),
                        help="role granted (repeat for several): train, serve, client (inference "
                             "only), operator (full status view)")
    invite.add_argument("--expires", type=duration, default=86400.0, metavar="DURATION",
                        help="the invite is void after this long (default 1d; e.g. 30m, 12h, 7d)")
    invite.add_argument("--uses", type=int, default=1, metavar="N",
                        help="how many keys may redeem it (default 1)")
    joinstr = sub.add_parser(
        "join-string", help="print a join string without an invite (open or token swarms)",
        description="Print the join string of this coordinator with no invite: enough for "
                    "--open swarms, or with the swarm token (closed swarms).")
    creds = sub.add_parser("credentials", help="list admitted identities and invites",
                           description="List admitted identities (roles, how admitted, expiry of "
                                       "the last credential, revocation) and invites (no secrets).")
    creds.add_argument("--json", action="store_true", help="machine-readable output")
    revoke = sub.add_parser(
        "revoke", help="revoke an identity (cut from the mesh) or an invite",
        description="Revoke a peer id (or a unique prefix): its requests get HTTP 403 'revoked' "
                    "within a second, it leaves the swarm, and peers drop it from the mesh "
                    "(heartbeat answers list it). Or revoke an unused invite by its id.")
    revoke.add_argument("target", metavar="PEER_ID|INVITE", help="peer id, prefix, or invite id")
    sub.add_parser("token", help="print a new strong swarm token (256 random bits)",
                   description="Print a random swarm token for --token (closed swarms).")
    for p in (invite, joinstr):
        p.add_argument("--url", help="coordinator URL for the join string (default: the one the "
                                     "coordinator wrote to <data-dir>/endpoint.json at start)")
    for p in (invite, joinstr, creds, revoke):
        p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="coordinator data dir")


def _open_auth_store(data_dir: Path):
    from coordinator.auth import AUTH_MIGRATIONS
    from coordinator.registry import MEMBERSHIP_MIGRATIONS
    from coordinator.store import DB_NAME, Store, StoreError

    if not (data_dir / DB_NAME).is_file():
        raise StoreError(f"no coordinator database in {data_dir}; start the coordinator once or "
                         "pass its --data-dir")
    store = Store(data_dir)
    store.open()
    store.apply_schema("membership", MEMBERSHIP_MIGRATIONS)
    store.apply_schema("auth", AUTH_MIGRATIONS)
    return store


def _join_string(data_dir: Path, url: str | None, invite: tuple[str, bytes] | None) -> str:
    """The join string of the coordinator whose data dir this is: URL (``url``, else the one it
    wrote at start), its authority key and, for https, the pinned certificate fingerprint."""
    import json

    from coordinator.auth import AUTHORITY_KEY, load_authority
    from coordinator.tls import CERT_NAME, fingerprint
    from peer.joinstring import JoinString

    if not (data_dir / AUTHORITY_KEY).is_file():
        raise ValueError(f"no {AUTHORITY_KEY} in {data_dir}; start the coordinator once or pass "
                         "its --data-dir")
    try:
        endpoint = json.loads((data_dir / ENDPOINT_FILE).read_text())
    except (OSError, ValueError):
        endpoint = {}
    url = url or endpoint.get("url")
    if not url:
        raise ValueError(f"no {data_dir / ENDPOINT_FILE} (start the coordinator once) and no --url")
    pin = None
    if url.startswith("https:"):
        pin = endpoint.get("fingerprint")
        if pin is None and (data_dir / CERT_NAME).is_file():  # the self-signed one made at start
            pin = fingerprint(data_dir / CERT_NAME)
    return JoinString(url, load_authority(data_dir).public_bytes, pin, *(invite or (None, None))).encode()


def run_admission(args: argparse.Namespace) -> int:
    """`coordinator invite|join-string|credentials|revoke|token`: errors -> exit 1."""
    import asyncio
    import json
    import time

    from coordinator.auth import create_invite, list_credentials, revoke
    from coordinator.store import StoreError

    if args.command == "token":
        print(secrets.token_urlsafe(32))
        return 0
    store = None
    try:
        if args.command == "join-string":
            print(_join_string(args.data_dir, args.url, None))
            return 0
        store = _open_auth_store(args.data_dir)
        if args.command == "invite":
            invite = asyncio.run(store.run(lambda conn: create_invite(
                conn, args.role, expires_s=args.expires, uses=args.uses, now=time.time())))
            print(_join_string(args.data_dir, args.url, invite))
        elif args.command == "revoke":
            print(asyncio.run(store.run(revoke, args.target, time.time())))
        else:
            listing = asyncio.run(store.run(list_credentials))
            print(json.dumps(listing, indent=1) if args.json else _credentials_text(listing))
        return 0
    except (StoreError, ValueError) as e:
        print(f"coordinator: {e}", file=sys.stderr)
        return 1
    finally:
        if store is not None:
            store.close()


def _credentials_text(listing: dict) -> str:
    import time

    def when(t: float | None) -> str:
        return "-" if t is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(t))
    lines = [f"{len(listing['identities'])} identities"]
    for r in listing["identities"]:
        lines.append(f"  {r['peer_id']}  {','.join(r['roles']):<22} via {r['via']:<24} "
                     f"expires {when(r['expires'])}"
                     + (f"  REVOKED {when(r['revoked_at'])}" if r["revoked_at"] else ""))
    lines.append(f"{len(listing['invites'])} invites")
    for r in listing["invites"]:
        state = ("revoked" if r["revoked_at"] else "expired" if r["expires"] <= time.time()
                 else "used up" if r["uses"] >= r["max_uses"] else "open")
        lines.append(f"  {r['invite_id']}  {','.join(r['roles']):<22} used {r['uses']}/"
                     f"{r['max_uses']}  expires {when(r['expires'])}  {state}")
    return "\n".join(lines)


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
    export = ckpt_sub.add_parser(
        "export", help="write a train checkpoint as a Hugging Face folder",
        description="Write a train run's checkpoint as a Hugging Face folder (model.safetensors with HF "
                    "tensor names, config.json, the run's tokenizer) that transformers' from_pretrained "
                    "and `peer join --serve DIR` load. Outer momenta are left out.")
    export.add_argument("step", help="step number or 'latest'")
    export.add_argument("out", type=Path, help="output directory")
    export.add_argument("--run", help="run name (default: the only run in the store)")
    export.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="weight dtype of the export (default: float32, the trained master copy)")
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
        import torch  # only now: listing and the parsers stay torch-free

        print(cli_export(args.data_dir, run, args.step, args.out, s3_url=args.s3,
                         endpoint_url=args.endpoint_url, dtype=getattr(torch, args.dtype)))
        return 0
    except (CheckpointError, OSError) as e:
        print(f"coordinator: {e}", file=sys.stderr)
        return 1


def _is_loopback(host: str) -> bool:
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tls_files(args: argparse.Namespace) -> tuple[Path, Path] | None:
    """(cert, key) to serve HTTPS with, or None for plain HTTP; SystemExit on a bad combination."""
    from coordinator.tls import self_signed

    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("coordinator: --tls-cert and --tls-key go together")
    if args.tls_cert is not None:
        if args.tls == "off":
            raise SystemExit("coordinator: --tls off contradicts --tls-cert")
        return args.tls_cert, args.tls_key
    if args.tls == "self-signed" or (args.tls == "auto" and not _is_loopback(args.host)):
        hosts = [args.host] if args.host not in ("0.0.0.0", "::", "") else []
        if args.public_url:
            from urllib.parse import urlsplit
            hosts.append(urlsplit(args.public_url).hostname or "")
        return self_signed(args.data_dir, [*hosts, "127.0.0.1"])
    if not _is_loopback(args.host) and not args.insecure:
        raise SystemExit(f"coordinator: refusing plain HTTP on {args.host}: request bodies would "
                         "travel in clear. Drop --tls off (a self-signed certificate is made), "
                         "give --tls-cert/--tls-key, or pass --insecure")
    return None


async def serve(config: CoordinatorConfig, token_source: str,
                tls: tuple[Path, Path] | None = None, public_url: str | None = None) -> int:
    import asyncio
    import json

    from aiohttp import web

    from coordinator.app import create_app
    from coordinator.auth import load_authority
    from coordinator.checkpoints import CheckpointError, open_backend
    from coordinator.store import Store, StoreError
    from coordinator.tls import TlsError, fingerprint, server_context
    from peer.runtime import wait_for_stop_signal

    ssl_context, pin = None, None
    if tls is not None:
        try:
            ssl_context, pin = server_context(*tls), fingerprint(tls[0])
        except TlsError as e:
            print(f"coordinator: {e}", file=sys.stderr)
            return 2

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
        site = web.TCPSite(runner, config.host, config.port, ssl_context=ssl_context)
        await site.start()
    except OSError as e:
        print(f"coordinator: cannot listen on {config.host}:{config.port}: {e.strerror or e}",
              file=sys.stderr)
        await runner.cleanup()
        store.close()
        return 2
    port = runner.addresses[0][1]
    shown_host = "127.0.0.1" if config.host in ("0.0.0.0", "") else config.host
    url = public_url or f"{'https' if ssl_context else 'http'}://{shown_host}:{port}"
    authority = load_authority(config.data_dir).public_bytes.hex()
    endpoint = {"url": url, "fingerprint": pin, "authority": authority}
    (config.data_dir / ENDPOINT_FILE).write_text(json.dumps(endpoint) + "\n")
    log.info("coordinator listening on %s:%s", config.host, port)
    log.info("status page: %s/", url)
    log.info("data dir: %s", config.data_dir)
    keep = config.retention
    log.info("checkpoints: %s (%s%s)", backend,
             f"keep last {keep.keep_last}" if keep.keep_last else "keep all",
             f", every step divisible by {keep.keep_every}" if keep.keep_every else "")
    log.info("admission: token %s%s; authority %s", token_source,
             ", open to anyone" if config.open else "", authority[:16])
    if pin:
        log.info("TLS certificate sha256 %s (join strings pin it)", pin)
    print("READY " + json.dumps({"url": url, "host": config.host, "port": port,
                                 "data_dir": str(config.data_dir), "pid": os.getpid(),
                                 "fingerprint": pin, "authority": authority}), flush=True)
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
    if args.command in ("invite", "join-string", "credentials", "revoke", "token"):
        return run_admission(args)
    import asyncio

    from coordinator.app import CoordinatorConfig
    from coordinator.checkpoint_routes import RetentionPolicy
    from peer.transport import install_event_loop_policy

    setup_logging(args.log_format, args.log_level)
    _quiet_libraries(args.log_level)
    token, source = resolve_token(args)
    if args.public_url:
        from peer.joinstring import JoinString
        try:
            JoinString(args.public_url, bytes(32))  # the URL checks join strings apply
        except ValueError as e:
            print(f"coordinator: --public-url: {e}", file=sys.stderr)
            return 2
    tls = tls_files(args)
    try:
        config = CoordinatorConfig(data_dir=args.data_dir, token=token, open=args.open,
                                   credential_lifetime_s=args.credential_lifetime,
                                   admit_rate_per_s=args.admit_rate,
                                   admit_burst=max(1, round(40 * args.admit_rate)), host=args.host,
                                   port=args.port, heartbeat_interval=args.heartbeat_interval,
                                   peer_timeout=args.peer_timeout,
                                   max_clock_skew=args.max_clock_skew,
                                   peer_rate_per_s=args.peer_rate,
                                   peer_burst=max(1, round(4 * args.peer_rate)),
                                   address_rate_per_s=args.address_rate,
                                   address_burst=max(1, round(5 * args.address_rate)),
                                   max_peers=args.max_peers, ban_after=args.ban_after,
                                   max_peers_per_address=args.max_peers_per_address or None,
                                   probe_reachability=not args.no_probe,
                                   checkpoint_store=args.checkpoint_store,
                                   s3_endpoint_url=args.endpoint_url,
                                   retention=RetentionPolicy(args.keep_last or None, args.keep_every,
                                                             args.gc_grace,
                                                             quota_bytes=args.checkpoint_quota or None,
                                                             pending_bytes=args.pending_quota))
    except ValueError as e:
        print(f"coordinator: {e}", file=sys.stderr)
        return 2
    install_event_loop_policy()  # uvloop where installed: cheaper request handling at scale
    return asyncio.run(serve(config, source, tls, args.public_url))
