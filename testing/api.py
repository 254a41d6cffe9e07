"""Blocking, signed coordinator requests for tests and benches: what `Authorization: Bearer` used
to be, now an admitted identity of its own.

``SignedApi(url, token=...)`` (or ``join=`` an invite, or neither on an ``--open`` coordinator):
the product's blocking client (peer/membership.py ``BlockingClient``), which admits a fresh key on
first use and signs every request.
``operator_api`` gets an operator credential (full ``/api/status`` view) by running
`coordinator invite --role operator` on the coordinator's data dir, as an operator would.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from peer.identity import Identity
from peer.membership import BlockingClient
from testing import ROOT


SignedApi = BlockingClient  # the name tests use: SignedApi(url, token=... | join=..., identity=...)


_CLIENTS: dict[tuple, SignedApi] = {}


def signed_get(url: str, path: str, *, token: str | None = None, join: str | None = None,
               timeout: float = 10.0) -> dict:
    """GET ``path`` as an identity admitted with ``token``/``join`` (one per coordinator and
    admission, kept for the process): the helper tests use where they read run state."""
    key = (url, token, join)
    client = _CLIENTS.get(key)
    if client is None:
        client = _CLIENTS[key] = SignedApi(url, token=token, join=join, timeout=timeout)
    return client.get(path)


def coordinator_cli(*args: str, timeout: float = 60) -> str:
    """Run `python -m coordinator ARGS` (an operator's offline command); its stdout."""
    done = subprocess.run([sys.executable, "-m", "coordinator", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"coordinator {' '.join(args)} failed ({done.returncode}):\n"
                           f"{done.stdout}{done.stderr}")
    return done.stdout


def invite(data_dir: str | Path, *roles: str, uses: int = 1, expires: str | None = None,
           url: str | None = None) -> str:
    """A join string from `coordinator invite` on ``data_dir`` (a running coordinator's)."""
    args = ["invite", "--data-dir", str(data_dir), "--uses", str(uses)]
    for role in roles:
        args += ["--role", role]
    if expires is not None:
        args += ["--expires", expires]
    if url is not None:
        args += ["--url", url]
    lines = [line for line in coordinator_cli(*args).splitlines() if line.startswith("lowband1:")]
    if len(lines) != 1:
        raise RuntimeError(f"coordinator invite printed no join string: {lines}")
    return lines[0]


def operator_api(url: str, data_dir: str | Path, key_path: str | Path | None = None) -> SignedApi:
    """A SignedApi holding an operator credential (sees every peer's address and stats);
    ``key_path``: keep its key in that file (e.g. for `peer status --key`)."""
    identity = Identity.load_or_create(key_path) if key_path is not None else None
    api = SignedApi(url, join=invite(data_dir, "operator", url=url), identity=identity)
    api.admit()
    return api

