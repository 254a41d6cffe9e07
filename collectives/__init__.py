"""Collectives over the peer mesh: pipelined ring all-reduce / reduce-scatter, all-gather,
broadcast, send/recv and a star all-reduce, with deadlines derived from measured links,
abort-agree-retry fault handling, bit-identical results and topology-aware ring ordering."""
from .allreduce import Reduced, Shard, all_reduce, reduce_scatter, ring_deadline_s
from .deadline import DeadlinePolicy
from .errors import CollectiveAborted, CollectiveError
from .group import Group
from .p2p import all_gather, broadcast, recv_tensors, send_tensors, star_all_reduce
from .robust import Offense, RobustConfig
from .topology import LinkMatrix, collect_matrix, optimize_ring, ring_order

__all__ = [
    "CollectiveAborted",
    "CollectiveError",
    "DeadlinePolicy",
    "Group",
    "LinkMatrix",
    "Offense",
    "Reduced",
    "RobustConfig",
    "Shard",
    "all_gather",
    "all_reduce",
    "broadcast",
    "collect_matrix",
    "optimize_ring",
    "recv_tensors",
    "reduce_scatter",
    "ring_deadline_s",
    "ring_order",
    "send_tensors",
    "star_all_reduce",
]
