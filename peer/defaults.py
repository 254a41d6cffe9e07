"""Defaults the peer daemon and the `peer` command share, in a module that imports nothing heavy
(the `peer` parser shows them before any command runs)."""
from __future__ import annotations

from pathlib import Path

DEFAULT_KEY_PATH = Path.home() / ".lowband" / "peer.key"
DEFAULT_LISTEN = "0.0.0.0:7070"
