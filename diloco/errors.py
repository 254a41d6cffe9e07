"""Typed errors of the training layer."""
from __future__ import annotations

from peer.errors import LowbandError


class DiLoCoError(LowbandError):
    """Base of every error raised by diloco/."""


class ConfigError(DiLoCoError, ValueError):
    """A trainer, schedule or data configuration that cannot work (e.g. H % P != 0)."""


class AveragingError(DiLoCoError):
    """An average did not complete: it timed out, the averager failed, or it returned tensors
    that do not match what was sent. The trainer's global state is left as it was before."""


class StateError(DiLoCoError, ValueError):
    """A state dict / snapshot that does not fit this trainer (other model, other schedule)."""


class DataError(DiLoCoError, ValueError):
    """A corpus that cannot be found, downloaded, read or sharded as asked."""
