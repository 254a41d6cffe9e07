"""Who may ask the coordinator what: admitted identities, invites, credentials, revocation, and
the one middleware that authenticates every request (contracts C2 and C3).

Identities. A peer or client is admitted under its own Ed25519 key by ``POST /api/admit``
(peer/admission.py) with an invite (``coordinator invite``: a secret with roles, an expiry and a
number of uses), a proof of the swarm token (closed swarm, ``--token``) or nothing (``--open``).
The ``identities`` table keeps its key, roles and revocation; the coordinator answers with a
credential (peer/credentials.py) signed by its authority key (``<data_dir>/authority.key``, 0600),
which the peer shows in mesh handshakes. An admitted key renews its credential by admitting again
with ``{}``. Admissions are rate-limited per address, and open-mode identities are forgotten a day
after their credential expired, so free identities cost bounded rows.

Requests. Every /api request is signed (peer/reqsign.py: method, path with query, body hash,
time, nonce). :func:`authenticate` (middleware) charges the remote address's rate bucket,
verifies the signature against the stored key, refuses replays (:class:`ReplayGuard`) and revoked
identities (403 ``revoked``), charges the identity's bucket and sets ``request[PRINCIPAL]``
(None only on the public read-only routes, :data:`PUBLIC_ROUTES`). Handlers then call
:func:`require_role`; body readers call ``validation.check_body``, so the bytes read are the
bytes signed.

Revocation (``coordinator revoke``) writes the database directly, like bans. A running coordinator
re-reads revocations at most every :data:`REVOCATION_REFRESH_S`; a newly revoked member then
leaves the swarm (``revocation_listeners``), and heartbeat answers list the revoked identities
whose last credential has not expired yet (after that the mesh refuses the credential anyway),
so peers cut them from the mesh (``PeerHost.revoke``).
"""
from __future__ import annotations

import logging
import secrets
import sqlite3
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Iterable, Sequence

from aiohttp import web

from coordinator.defaults import DEFAULT_CREDENTIAL_LIFETIME_S, DEFAULT_MAX_CLOCK_SKEW_S
from coordinator.store import Store, add_event
from coordinator.validation import PRINCIPAL, ApiError, RateLimited, charge, read_json_object
from peer import admission, reqsign
from peer.credentials import ROLES, Credential, issue
from peer.errors import ProtocolError
from peer.identity import Identity, peer_id_from_public
from peer.ratelimit import RateLimiter

log = logging.getLogger("lowband.coordinator.auth")

AUTHORITY_KEY = "authority.key"
REVOCATION_REFRESH_S = 0.5
MAX_REVOKED_LISTED = 4096
MAX_CACHED_IDENTITIES = 65536
# Open-admission identities whose credential expired this long ago are forgotten (they may be
# admitted again at will), so free identities cannot grow the table without bound.
FORGET_OPEN_AFTER_S = 86400.0
FORGET_BATCH = 100
# Reachable without a signature (read-only, and /api/status is redacted for them).
PUBLIC_ROUTES = frozenset({"/", "/static/{name}", "/api/status", "/api/health", "/metrics"})


AUTH_MIGRATIONS: Sequence[str] = (
    """
    CREATE TABLE identities (
        peer_id     TEXT PRIMARY KEY,
        public_key  TEXT NOT NULL,
        roles       TEXT NOT NULL,
        via         TEXT NOT NULL,
        address     TEXT,
        admitted_at REAL NOT NULL,
        serial      INTEGER NOT NULL,
        expires     REAL NOT NULL,
        revoked_at  REAL
    );
    CREATE INDEX identities_revoked ON identities(revoked_at);
    CREATE TABLE invites (
        invite_id  TEXT PRIMARY KEY,
        secret     TEXT NOT NULL,
        roles      TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires    REAL NOT NULL,
        max_uses   INTEGER NOT NULL,
        uses       INTEGER NOT NULL DEFAULT 0,
        revoked_at REAL
    );
    """,
)


@dataclass(frozen=True)
class Principal:
    """The authenticated sender of a request."""

    peer_id: str
    roles: frozenset[str]
    public_key: bytes = b""

    def has(self, role: str) -> bool:
        return role in self.roles


@dataclass(frozen=True)
class Admission:
    """How admission works on this coordinator."""

    token: str | None = None  # closed swarm: token proofs admit with OPEN_ROLES
    open: bool = False        # anyone is admitted with OPEN_ROLES
    credential_lifetime_s: float = DEFAULT_CREDENTIAL_LIFETIME_S
    max_skew_s: float = DEFAULT_MAX_CLOCK_SKEW_S


def load_authority(data_dir: Path) -> Identity:
    """The coordinator's credential-signing key, created on first use (mode 0600)."""
    return Identity.load_or_create(Path(data_dir) / AUTHORITY_KEY)


def _roles_text(roles: Iterable[str]) -> str:
    return ",".join(sorted(set(roles)))


def _roles(text: str) -> frozenset[str]:
    return frozenset(r for r in text.split(",") if r)


# -- SQL (runs on the store's writer thread inside a transaction) ------------------------------
def _identity_row(conn: sqlite3.Connection, peer_id: str) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM identities WHERE peer_id = ?", (peer_id,)).fetchone()


def _next_serial(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT COALESCE(MAX(serial), 0) + 1 FROM identities").fetchone()[0]


def _admit(conn: sqlite3.Connection, authority: Identity, public_key: bytes,
           request: admission.AdmitRequest, mode: Admission, address: str, now: float) -> dict:
    """Admit (or renew) ``public_key``; ApiError on a refused proof. -> AdmitAnswer JSON."""
    peer_id = peer_id_from_public(public_key)
    row = _identity_row(conn, peer_id)
    if row is not None and row["revoked_at"] is not None:
        raise ApiError(403, "revoked", f"identity {peer_id} was revoked; it cannot be admitted again "
                                       "(a new key needs a new invite)")
    roles: set[str] = set() if row is None else set(_roles(row["roles"]))
    via = None if row is None else row["via"]
    if request.invite is not None:
        inv = conn.execute("SELECT * FROM invites WHERE invite_id = ?", (request.invite,)).fetchone()
        if inv is None or not admission.macs_equal(
                request.proof or "", admission.invite_proof(bytes.fromhex(inv["secret"]), public_key)):
            raise ApiError(403, "bad_invite", "unknown invite or wrong proof (check the join string)")
        if inv["revoked_at"] is not None:
            raise ApiError(403, "invite_revoked", f"invite {inv['invite_id']} was revoked")
        if now >= inv["expires"]:
            raise ApiError(403, "invite_expired", f"invite {inv['invite_id']} expired; ask for a new one")
        if inv["uses"] >= inv["max_uses"]:
            raise ApiError(403, "invite_used", f"invite {inv['invite_id']} was used "
                                               f"{inv['uses']} time(s), its limit")
        conn.execute("UPDATE invites SET uses = uses + 1 WHERE invite_id = ?", (inv["invite_id"],))
        roles |= _roles(inv["roles"])
        via = f"invite:{inv['invite_id']}"
    elif request.token_proof is not None:
        if mode.token is None:
            raise ApiError(403, "no_token_mode", "this coordinator admits by invite, not by token")
        if not admission.macs_equal(request.token_proof,
                                    admission.token_proof(mode.token, public_key)):
            raise ApiError(403, "bad_token_proof", "token proof does not verify (wrong swarm token)")
        roles |= admission.OPEN_ROLES
        via = via or "token"
    elif row is None:
        if not mode.open:
            raise ApiError(403, "not_admitted", "this swarm is not open: redeem an invite "
                                                "(`coordinator invite` prints a join string)"
                                                + (" or prove the swarm token" if mode.token else ""))
        roles |= admission.OPEN_ROLES
        via = "open"
    serial = _next_serial(conn)
    cred = issue(authority, public_key, roles, now=now, lifetime_s=mode.credential_lifetime_s,
                 serial=serial)
    conn.execute(
        "INSERT INTO identities (peer_id, public_key, roles, via, address, admitted_at, serial, "
        "expires) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(peer_id) DO UPDATE SET "
        "roles = excluded.roles, via = excluded.via, serial = excluded.serial, "
        "expires = excluded.expires",
        (peer_id, public_key.hex(), _roles_text(roles), via, address, now, serial, cred.expires))
    if row is None:
        add_event(conn, "admitted", peer_id, {"roles": sorted(roles), "via": via}, now)
        if via == "open":
            _forget_stale_open(conn, now)
    mac = None if mode.token is None else admission.token_mac(mode.token, authority.public_bytes,
                                                               cred.encode())
    return admission.AdmitAnswer(cred, mac).to_json()


def _forget_stale_open(conn: sqlite3.Connection, now: float) -> int:
    """Delete up to FORGET_BATCH open-mode identities expired FORGET_OPEN_AFTER_S ago."""
    return conn.execute(
        "DELETE FROM identities WHERE peer_id IN (SELECT peer_id FROM identities WHERE via = 'open' "
        "AND revoked_at IS NULL AND expires < ? LIMIT ?)",
        (now - FORGET_OPEN_AFTER_S, FORGET_BATCH)).rowcount


def _revocations(conn: sqlite3.Connection, now: float) -> tuple[set[str], list[str]]:
    """(every revoked peer id, those whose last credential is still unexpired, newest first)."""
    rows = conn.execute("SELECT peer_id, expires FROM identities WHERE revoked_at IS NOT NULL "
                        "ORDER BY revoked_at DESC").fetchall()
    return ({r[0] for r in rows},
            [r[0] for r in rows if r[1] > now][:MAX_REVOKED_LISTED])


def create_invite(conn: sqlite3.Connection, roles: Iterable[str], *, expires_s: float, uses: int,
                  now: float) -> tuple[str, bytes]:
    """A new invite -> (id, secret). ValueError on unknown roles or bad limits."""
    roles = set(roles)
    if not roles or roles - ROLES:
        raise ValueError(f"roles must be a non-empty subset of {sorted(ROLES)}, got {sorted(roles)}")
    if not expires_s > 0 or uses < 1:
        raise ValueError("an invite needs a positive lifetime and at least one use")
    invite_id, secret = secrets.token_hex(8), secrets.token_bytes(32)
    conn.execute("INSERT INTO invites (invite_id, secret, roles, created_at, expires, max_uses) "
                 "VALUES (?, ?, ?, ?, ?, ?)",
                 (invite_id, secret.hex(), _roles_text(roles), now, now + expires_s, uses))
    add_event(conn, "invite_created", None, {"invite": invite_id, "roles": sorted(roles),
                                             "uses": uses}, now)
    return invite_id, secret


def list_credentials(conn: sqlite3.Connection) -> dict:
    """Identities and invites (no secrets) for `coordinator credentials`."""
    identities = [{k: r[k] for k in ("peer_id", "via", "address", "admitted_at", "serial",
                                     "expires", "revoked_at")} | {"roles": sorted(_roles(r["roles"]))}
                  for r in conn.execute("SELECT * FROM identities ORDER BY admitted_at")]
    invites = [{k: r[k] for k in ("invite_id", "created_at", "expires", "max_uses", "uses",
                                  "revoked_at")} | {"roles": sorted(_roles(r["roles"]))}
               for r in conn.execute("SELECT * FROM invites ORDER BY created_at")]
    return {"identities": identities, "invites": invites}


def revoke(conn: sqlite3.Connection, target: str, now: float) -> str:
    """Revoke an identity (peer id or a unique prefix of one) or an invite id -> what was done."""
    target = target.strip().lower()
    if not 4 <= len(target) <= 40 or any(c not in "0123456789abcdef" for c in target):
        raise ValueError(f"{target!r} is neither a peer id nor an invite id (hex)")
    if conn.execute("UPDATE invites SET revoked_at = ? WHERE invite_id = ? AND revoked_at IS NULL",
                    (now, target)).rowcount:
        add_event(conn, "invite_revoked", None, {"invite": target}, now)
        return f"revoked invite {target}"
    matches = [r[0] for r in conn.execute("SELECT peer_id FROM identities WHERE peer_id LIKE ?",
                                          (target + "%",))]
    if len(matches) != 1:
        raise ValueError(f"{target!r} matches {len(matches)} identities and no open invite")
    peer_id = matches[0]
    if not conn.execute("UPDATE identities SET revoked_at = ? WHERE peer_id = ? AND "
                        "revoked_at IS NULL", (now, peer_id)).rowcount:
        return f"{peer_id} was revoked already"
    add_event(conn, "revoked", peer_id, {}, now)
    return f"revoked identity {peer_id}"


# -- the service the middleware and routes use ------------------------------------------------
class Auth:
    """Identity lookups (cached: keys never change, roles change only here), revocations
    (re-read every REVOCATION_REFRESH_S), replay protection and admission."""

    def __init__(self, store: Store, authority: Identity, mode: Admission) -> None:
        self.store = store
        self.authority = authority
        self.mode = mode
        self.guard = reqsign.ReplayGuard(mode.max_skew_s)
        self._identities: OrderedDict[str, tuple[bytes, frozenset[str]]] = OrderedDict()
        self._revoked: set[str] = set()
        self._revoked_listed: list[str] = []
        self._revoked_at = float("-inf")
        # called with each newly seen revoked peer id (membership makes it leave the swarm)
        self.revocation_listeners: list[Callable[[str], Awaitable[None]]] = []
        store.apply_schema("auth", AUTH_MIGRATIONS)

    async def _refresh_revocations(self) -> None:
        now = time.monotonic()
        if now - self._revoked_at >= REVOCATION_REFRESH_S:
            self._revoked_at = now
            before = self._revoked
            self._revoked, self._revoked_listed = await self.store.run(_revocations, time.time())
            for peer_id in self._revoked - before:
                log.warning("identity %s is revoked", peer_id[:12])
                for listener in self.revocation_listeners:
                    await listener(peer_id)

    async def revoked_list(self) -> list[str]:
        """Revoked identities whose last credential is still unexpired (heartbeat answers)."""
        await self._refresh_revocations()
        return self._revoked_listed

    async def identity(self, peer_id: str) -> tuple[bytes, frozenset[str]] | None:
        hit = self._identities.get(peer_id)
        if hit is not None:
            self._identities.move_to_end(peer_id)
            return hit
        row = await self.store.run(_identity_row, peer_id)
        if row is None:
            return None
        return self._remember(peer_id, bytes.fromhex(row["public_key"]), _roles(row["roles"]))

    def _remember(self, peer_id: str, key: bytes, roles: frozenset[str]) -> tuple[bytes, frozenset[str]]:
        self._identities[peer_id] = (key, roles)
        self._identities.move_to_end(peer_id)
        while len(self._identities) > MAX_CACHED_IDENTITIES:
            self._identities.popitem(last=False)
        return key, roles

    async def authenticate(self, request: web.Request) -> Principal:
        """Verify the request's signature headers -> its principal; ApiError otherwise."""
        try:
            signed = reqsign.parse_headers(request.headers)
        except reqsign.RequestAuthError as e:
            raise ApiError(e.status, e.code, str(e)) from None
        admit = request.method == "POST" and request.path == admission.ADMIT_PATH
        if admit:
            if signed.public_key is None:
                raise ApiError(400, "missing_key", f"{admission.ADMIT_PATH} needs the "
                                                   f"{reqsign.H_KEY} header (the new public key)")
            key, known = signed.public_key, await self.identity(signed.peer_id)
            roles = frozenset() if known is None else known[1]
        else:
            known = await self.identity(signed.peer_id)
            if known is None:
                raise ApiError(403, "unknown_identity", f"identity {signed.peer_id} is not admitted; "
                                                        "redeem a join string first")
            key, roles = known
        try:
            signed.verify(key, request.method, request.raw_path, now=time.time(),
                          max_skew_s=self.mode.max_skew_s)
            self.guard.check(signed.peer_id, signed.nonce, signed.timestamp, time.time())
        except reqsign.RequestAuthError as e:
            raise ApiError(e.status, e.code, str(e)) from None
        await self._refresh_revocations()
        if signed.peer_id in self._revoked:
            raise ApiError(403, "revoked", f"identity {signed.peer_id} was revoked by the operator")
        charge(request, "peer", signed.peer_id)
        return Principal(signed.peer_id, roles, key)

    async def admit(self, public_key: bytes, body: admission.AdmitRequest, address: str) -> dict:
        answer = await self.store.run(_admit, self.authority, public_key, body, self.mode,
                                      address, time.time())
        cred = Credential.decode(bytes.fromhex(answer["credential"]))
        self._remember(cred.peer_id, public_key, cred.roles)
        return answer


AUTH = web.AppKey("auth", Auth)


def require_role(request: web.Request, *roles: str) -> Principal:
    """The request's principal if it holds one of ``roles`` (none given: any admitted identity);
    401 when unsigned, 403 ``forbidden`` when it lacks the role."""
    principal: Principal | None = request.get(PRINCIPAL)
    if principal is None:
        raise ApiError(401, "missing_signature", "this route needs a signed request from an "
                                                 "admitted identity (peer/reqsign.py)")
    if roles and not principal.roles.intersection(roles):
        raise ApiError(403, "forbidden", f"this route needs role {' or '.join(roles)}; identity "
                                         f"{principal.peer_id} holds "
                                         f"{', '.join(sorted(principal.roles)) or 'no role'}")
    return principal


@web.middleware
async def authenticate(request: web.Request, handler):
    """Charge the address, authenticate signed requests, refuse unsigned ones off the public
    routes. Sits inside json_errors, so every refusal is a JSON answer."""
    charge(request, "address", request.remote or "?")
    resource = request.match_info.route.resource
    if reqsign.has_signature(request.headers):
        request[PRINCIPAL] = await request.app[AUTH].authenticate(request)
    elif resource is None or (request.method in ("GET", "HEAD")
                              and resource.canonical in PUBLIC_ROUTES):
        request[PRINCIPAL] = None  # unmatched routes 404 in the handler
    elif "Authorization" in request.headers:
        raise ApiError(401, "bearer_not_accepted", "bearer tokens are no longer accepted: sign "
                                                   "the request with an admitted key (peer/reqsign.py)")
    else:
        raise ApiError(401, "missing_signature", "unsigned request: sign it with an admitted key "
                                                 "(peer/reqsign.py)")
    return await handler(request)


async def admit_route(request: web.Request) -> web.Response:
    """POST /api/admit: see peer/admission.py."""
    principal = require_role(request)
    admit_limiter = request.app[ADMIT_LIMITER]
    wait = admit_limiter.acquire(request.remote or "?")
    if wait:
        raise RateLimited(f"too many admissions from this address (limit {admit_limiter.rate:g}/s, "
                          f"burst {admit_limiter.burst}); retry after {wait:.0f}s", wait)
    try:
        body = admission.AdmitRequest.from_json(await read_json_object(request, 4096))
    except ProtocolError as e:
        raise ApiError(400, "bad_admit", str(e)) from None
    answer = await request.app[AUTH].admit(principal.public_key, body, request.remote or "?")
    log.info("admitted %s as %s", principal.peer_id[:12], ",".join(answer["roles"]))
    return web.json_response(answer)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


ADMIT_LIMITER = web.AppKey("admit_limiter", RateLimiter)


def setup_auth(app: web.Application, store: Store, authority: Identity, mode: Admission,
               admit_limiter: RateLimiter) -> Auth:
    """Register the auth service, its middleware (call before other middlewares are appended)
    and the admission and health routes."""
    auth = Auth(store, authority, mode)
    app[AUTH] = auth
    app[ADMIT_LIMITER] = admit_limiter
    app.router.add_post(admission.ADMIT_PATH, admit_route)
    app.router.add_get("/api/health", health)
    return auth
