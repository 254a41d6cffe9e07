"""The `peer join --train RUN` flags (entry-point group ``lowband.role_options``, name ``train``)
and how their parsed values become a :class:`TrainOptions`. Torch-free: building the `peer`
parser imports this module, while diloco/role.py (torch) loads only when the role runs."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .run_spec import CODECS, ROBUST_MODES, RunConfig

# RunConfig field -> (flag, type, help); argparse dests are PREFIX + field, and DATA_DEST for --data.
PREFIX = "train_"
DATA_DEST = "train_data"
FLAGS: dict[str, tuple[str, type, str]] = {
    "preset": ("--preset", str, "model preset (micro, tiny, smollm2-135m)"),
    "inner_steps": ("--inner-steps", int, "H: inner steps per outer step"),
    "inner_seconds": ("--inner-seconds", float,
                      "wall-clock inner-phase budget per outer step, at most H steps (heterogeneous "
                      "peers; 0 = use H)"),
    "total_steps": ("--outer-steps", int, "stop the run at this outer step (0 = never)"),
    "codec": ("--codec", str, "all-reduce codec for pseudo-gradients"),
    "error_feedback": ("--error-feedback", bool, "quantize pseudo-gradients under error feedback"),
    "zstd": ("--zstd", bool, "compress the codec's bytes with zstd on the wire (lossless)"),
    "outer_lr": ("--outer-lr", float, "outer (Nesterov) learning rate"),
    "outer_momentum": ("--outer-momentum", float, "outer momentum"),
    "inner_lr": ("--inner-lr", float, "inner AdamW learning rate"),
    "seq_len": ("--seq-len", int, "tokens per training sequence"),
    "batch_size": ("--batch-size", int, "sequences per inner step"),
    "seed": ("--seed", int, "run seed (model init and data order)"),
    "checkpoint_every": ("--checkpoint-every", int, "outer steps between checkpoints (0 = never)"),
    "sync_timeout_s": ("--sync-timeout", float, "seconds a rendezvous waits for stragglers"),
    "min_peers": ("--min-peers", int, "a rendezvous waits for this many peers (up to the timeout)"),
    "robust": ("--robust", str, "average over the robust all-reduce: detect (exclude poisoned "
                                "pseudo-gradients and report their senders), trimmed / clip (and "
                                "trimmed mean / centered clipping of the rest); off: the plain "
                                "ring, no screening (only for a swarm whose peers you trust)"),
}
_CHOICES: dict[str, tuple[str, ...]] = {"codec": CODECS, "robust": tuple(ROBUST_MODES)}
_METAVARS = {"preset": "NAME", "inner_seconds": "SECONDS", "sync_timeout_s": "SECONDS"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the train role's options to `peer join`. Their argparse default is None, so only the
    flags a peer sets explicitly reach the run config (the run's creator wins on the rest); the
    help shows RunConfig's default, which a new run takes."""
    group = parser.add_argument_group(
        "train role (needs --train RUN)",
        "Run config values: a new run takes the ones given (else the defaults shown); joining an "
        "existing run, a given value that differs from the stored one is an error.")
    group.add_argument("--data", dest=DATA_DEST, metavar="PATH",
                       help="text file or folder to train on (default: the Shakespeare corpus)")
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    for field_name, (flag, kind, help_text) in FLAGS.items():
        dest, default = PREFIX + field_name, defaults[field_name]
        if kind is bool:
            group.add_argument(flag, dest=dest, action="store_true", default=None,
                               help=f"{help_text} (default: {'on' if default else 'off'})")
        else:
            choices = _CHOICES.get(field_name)
            group.add_argument(flag, dest=dest, type=kind, default=None, choices=choices,
                               metavar=None if choices else _METAVARS.get(field_name, kind.__name__.upper()),
                               help=f"{help_text} (default: {default:g})" if kind is float else
                                    f"{help_text} (default: {default})")


@dataclass(frozen=True)
class TrainOptions:
    """This peer's options: run config values it sets explicitly, and local settings."""

    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    data: str | None = None

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> "TrainOptions":
        """From the parsed `peer join` options of this role (``add_arguments`` dests:
        ``train_data`` and ``train_<RunConfig field>``; None = not given)."""
        given = {k: v for k, v in (options or {}).items() if v is not None}
        unknown = sorted(k for k in given if k != DATA_DEST and k.removeprefix(PREFIX) not in FLAGS)
        if unknown:
            raise ConfigError(f"unknown train options {unknown}")
        data = given.pop(DATA_DEST, None)
        return cls({k.removeprefix(PREFIX): v for k, v in given.items()}, data)
