"""DiLoCo-family trainers (DiLoCo, Streaming DiLoCo, eager/delayed outer steps), the averaging
interface they train through, and deterministic per-peer data shards."""
from .averager import AverageResult, Averager, LocalAverager, LocalGroup
from .base import OuterConfig
from .diloco import DiLoCo, DiLoCoConfig, OuterMode, OuterReport
from .errors import AveragingError, ConfigError, DataError, DiLoCoError, StateError
from .fragments import strided_fragments
from .inner import BatchSource, InnerReport
from .streaming import StreamingConfig, StreamingDiLoCo, StreamingReport, StreamingSchedule, SyncReport

__all__ = [
    "AverageResult", "Averager", "AveragingError", "BatchSource", "ConfigError", "DataError",
    "DiLoCo", "DiLoCoConfig", "DiLoCoError", "InnerReport", "LocalAverager", "LocalGroup",
    "OuterConfig", "OuterMode", "OuterReport", "StateError", "StreamingConfig", "StreamingDiLoCo",
    "StreamingReport", "StreamingSchedule", "SyncReport", "strided_fragments",
]
