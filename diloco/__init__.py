"""DiLoCo-family trainers (DiLoCo, Streaming DiLoCo, eager/delayed outer steps), the averaging
interface they train through, and deterministic per-peer data shards.

The names below are imported on first use (PEP 562), so torch-free submodules such as
``diloco.train_options`` (the `peer join --train` flags) load without torch and `peer --help`
stays fast."""
from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule that defines it
_EXPORTS = {
    "AverageResult": "averager", "Averager": "averager", "LocalAverager": "averager",
    "LocalGroup": "averager", "OuterConfig": "base", "DiLoCo": "diloco", "DiLoCoConfig": "diloco",
    "OuterMode": "diloco", "OuterReport": "diloco", "AveragingError": "errors",
    "ConfigError": "errors", "DataError": "errors", "DiLoCoError": "errors", "StateError": "errors",
    "strided_fragments": "fragments", "BatchSource": "inner", "InnerReport": "inner",
    "StreamingConfig": "streaming", "StreamingDiLoCo": "streaming", "StreamingReport": "streaming",
    "StreamingSchedule": "streaming", "SyncReport": "streaming",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'diloco' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
