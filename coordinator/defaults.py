"""Defaults the coordinator and its command share, in a module that imports nothing heavy (the
`coordinator` parser shows them before any command runs)."""
from __future__ import annotations

from pathlib import Path

DEFAULT_DATA_DIR = Path.home() / ".lowband" / "coordinator"
DEFAULT_PORT = 8470
DEFAULT_BAN_AFTER = 2      # distinct reporters of poisoned updates that ban a peer (0: never)
DEFAULT_GRACE_S = 3600.0   # GC never deletes younger unreferenced chunks: an upload may be in flight
DEFAULT_CREDENTIAL_LIFETIME_S = 86400.0  # issued credentials last a day; peers renew them
DEFAULT_MAX_CLOCK_SKEW_S = 60.0   # signed requests: accepted clock difference = replay window
DEFAULT_ADMIT_RATE = 0.5          # admissions per second per address (bursts of 40x)
DEFAULT_MAX_PEERS_PER_ADDRESS = 256
DEFAULT_CHECKPOINT_QUOTA_BYTES = 64 * 1024**3  # chunks per run (checkpoint_routes.RetentionPolicy)
