"""API keys and per-key quotas of the OpenAI gateway (sans-IO: no aiohttp, no torch).

Keys file (``peer gateway --api-keys-file FILE``), one key per line::

    # comments and blank lines are ignored
    KEY [name=NAME] [concurrent=N] [prompts=N] [max_tokens=N] [kv_slots=N]
    sha256:HEX [name=NAME] ...        # the key's SHA-256 (hex) instead of the key itself

A key is at least 16 characters (``python -c "import secrets; print(secrets.token_urlsafe(32))"``);
fields left out take the gateway's defaults (its ``--max-*`` flags). The ``sha256:`` form keeps
the file free of secrets.

Lookup (``KeyRing.match``) hashes the presented key and compares the digest with every
configured digest with ``hmac.compare_digest``, never stopping at the first match, so the time
taken says nothing about which key matched or how much of one agreed.

Quotas hold per principal (a key, or a client address when the gateway has no keys) over its
requests in flight (``Usage``): ``concurrent`` requests at once, ``prompts`` per request,
``max_tokens`` per request, and ``kv_slots``: rows x (longest prompt + max_tokens) summed over its
requests in flight, which is what the stage servers reserve for them. The gateway as a whole has
its own concurrency and KV budget on top (``Usage(total_concurrent, total_kv_slots)``): the
servers charge every session the gateway opens to the gateway's one peer id, so its total should
stay within a server's per-client share (``ServeConfig.max_client_tokens``).

A request without ``max_tokens`` gets the rest of the model's context, clamped to its
principal's ``max_tokens`` and to a fair share of its KV slots (``default_max_tokens``): the
clamp, not a refusal, because an OpenAI client that sets no max_tokens means "as long as you
allow"; ``finish_reason: "length"`` tells it where the clamp cut.
"""
from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

MIN_KEY_CHARS = 16
_FIELDS = ("concurrent", "prompts", "max_tokens", "kv_slots")


@dataclass(frozen=True)
class Quota:
    concurrent: int = 4         # requests in flight
    prompts: int = 16           # prompts in one request
    max_tokens: int = 4096      # max_tokens of one request
    kv_slots: int = 1 << 14     # rows x (prompt + max_tokens), summed over requests in flight

    def __post_init__(self) -> None:
        for name in _FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"quota {name} must be an integer >= 1, got {v!r}")


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes = field(repr=False)   # sha256 of the key
    quota: Quota = Quota()


def key_digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass") if isinstance(key, str) else key).digest()


class KeyRing:
    """The configured keys; ``match`` finds the one presented, in constant time over all."""

    def __init__(self, keys: Iterable[ApiKey]):
        self.keys = list(keys)
        if not self.keys:
            raise ValueError("an API key list needs at least one key")
        if len({k.digest for k in self.keys}) != len(self.keys):
            raise ValueError("the same API key is listed twice")

    @classmethod
    def parse(cls, text: str, default: Quota = Quota(), source: str = "API keys") -> "KeyRing":
        """Keys in the file format of the module docstring; ValueError naming the line."""
        keys = []
        for number, line in enumerate(text.splitlines(), 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            where = f"{source} line {number}"
            secret, options = words[0], words[1:]
            if m := re.fullmatch(r"sha256:([0-9a-fA-F]{64})", secret):
                digest = bytes.fromhex(m[1])
            elif secret.startswith("sha256:"):
                raise ValueError(f"{where}: 'sha256:' must be followed by 64 hex digits")
            elif len(secret) < MIN_KEY_CHARS:
                raise ValueError(f"{where}: a key needs at least {MIN_KEY_CHARS} characters (generate one with "
                                 f"python -c \"import secrets; print(secrets.token_urlsafe(32))\")")
            else:
                digest = key_digest(secret)
            name, quota = f"key{number}", {}
            for opt in options:
                k, eq, v = opt.partition("=")
                if not eq or not v:
                    raise ValueError(f"{where}: expected NAME=VALUE, got {opt!r}")
                if k == "name":
                    name = v
                elif k in _FIELDS:
                    if not re.fullmatch(r"\d+", v) or int(v) < 1:
                        raise ValueError(f"{where}: {k} must be an integer >= 1, got {v!r}")
                    quota[k] = int(v)
                else:
                    raise ValueError(f"{where}: unknown field {k!r} (known: name, {', '.join(_FIELDS)})")
            keys.append(ApiKey(name, digest, replace(default, **quota)))
        try:
            return cls(keys)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path: str | Path, default: Quota = Quota()) -> "KeyRing":
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read API keys file {path}: {e}") from e
        return cls.parse(text, default, str(path))

    def match(self, presented: str | bytes) -> ApiKey | None:
        digest = key_digest(presented)
        found = None
        for key in self.keys:  # every key is compared: no early exit
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found


class QuotaExceeded(Exception):
    """A request over a quota of its principal or of the gateway; ``kind``: "requests" (too
    many at once), "tokens" (KV slots now held) or "size" (more KV slots than ever allowed)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


class Usage:
    """What each principal and the whole gateway have in flight; entries go when they reach 0."""

    def __init__(self, total_concurrent: int = 64, total_kv_slots: int = 1 << 14):
        if min(total_concurrent, total_kv_slots) < 1:
            raise ValueError("gateway totals must be >= 1")
        self.total_concurrent, self.total_kv_slots = total_concurrent, total_kv_slots
        self.requests: dict[str, int] = {}
        self.kv: dict[str, int] = {}
        self.all_requests = 0
        self.all_kv = 0

    def begin(self, who: str, quota: Quota) -> "Lease":
        """One more request of ``who``; QuotaExceeded when it has ``quota.concurrent`` already."""
        if self.requests.get(who, 0) >= quota.concurrent:
            raise QuotaExceeded(f"this client already has {quota.concurrent} requests in flight (its limit); "
                                f"retry when one finishes", "requests")
        if self.all_requests >= self.total_concurrent:
            raise QuotaExceeded(f"the gateway is serving {self.total_concurrent} requests (its limit); retry later",
                                "requests")
        self.requests[who] = self.requests.get(who, 0) + 1
        self.all_requests += 1
        return Lease(self, who, quota)


class Lease:
    """One request's share of its principal's quota; ``release`` once (idempotent)."""

    def __init__(self, usage: Usage, who: str, quota: Quota):
        self.usage, self.who, self.quota = usage, who, quota
        self.kv = 0
        self.open = True

    def charge_kv(self, slots: int) -> None:
        """Reserve ``slots`` KV slots; QuotaExceeded kind "size" when no wait could make room."""
        u, held = self.usage, self.usage.kv.get(self.who, 0)
        if slots > min(self.quota.kv_slots, u.total_kv_slots):
            raise QuotaExceeded(f"this request needs {slots} KV slots (rows x (prompt + max_tokens)), more than "
                                f"this client may hold ({min(self.quota.kv_slots, u.total_kv_slots)}): send fewer "
                                f"prompts or a smaller max_tokens", "size")
        if held + slots > self.quota.kv_slots:
            raise QuotaExceeded(f"this request needs {slots} KV slots (rows x (prompt + max_tokens)); this client "
                                f"holds {held} of its {self.quota.kv_slots}", "tokens")
        if u.all_kv + slots > u.total_kv_slots:
            raise QuotaExceeded(f"this request needs {slots} KV slots; the gateway holds {u.all_kv} of its "
                                f"{u.total_kv_slots}; retry later", "tokens")
        u.kv[self.who] = held + slots
        u.all_kv += slots
        self.kv += slots

    def release(self) -> None:
        if not self.open:
            return
        self.open = False
        u = self.usage
        for table, n in ((u.requests, 1), (u.kv, self.kv)):
            left = table.get(self.who, 0) - n
            if left > 0:
                table[self.who] = left
            else:
                table.pop(self.who, None)
        u.all_requests -= 1
        u.all_kv -= self.kv


def default_max_tokens(quota: Quota, *, room: int, rows: int, longest: int, total_kv_slots: int) -> int:
    """``max_tokens`` of a request that sets none: the context left after its longest prompt
    (``room``), clamped to the principal's ``max_tokens`` and to its fair KV share per request,
    ``min(kv_slots, total_kv_slots) // concurrent`` slots for rows x (longest + max_tokens), so a
    principal's concurrent requests that all leave max_tokens unset fit its KV quota together.
    QuotaExceeded("size") when that share leaves no room for one token."""
    share = min(quota.kv_slots, total_kv_slots) // quota.concurrent
    fits = share // rows - longest
    if fits < 1:
        raise QuotaExceeded(f"{rows} x {longest} prompt tokens leave no room for a completion in this client's "
                            f"share of KV slots per request ({share} = min(kv_slots, gateway total) / "
                            f"{quota.concurrent} concurrent): set max_tokens, or send a shorter prompt or fewer "
                            f"choices", "size")
    return min(room, quota.max_tokens, fits)
