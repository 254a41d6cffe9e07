"""Defaults the coordinator and its command share, in a module that imports nothing heavy (the
`coordinator` parser shows them before any command runs)."""
from __future__ import annotations

from pathlib import Path

DEFAULT_DATA_DIR = Path.home() / ".lowband" / "coordinator"
DEFAULT_PORT = 8470
DEFAULT_BAN_AFTER = 2      # distinct reporters of poisoned updates that ban a peer (0: never)
DEFAULT_GRACE_S = 3600.0   # GC never deletes younger unreferenced chunks: an upload may be in flight
