"""Test-only child for tests/test_poison_train.py: ``peer join`` whose train role sends a
poisoned pseudo-gradient at every outer step.

    python -m tests.poison_child join ... --train RUN     (the arguments of `peer join`)

``LOWBAND_TEST_POISON`` names the attacks, one per outer step in turn (comma-separated):
flip (-Delta), huge (Delta x 1e3; bench/poison.py's attacks) and nan (Delta with a NaN).
Nothing of the code under test is patched: the `train` entry point (diloco.role:TrainRole)
resolves to a subclass whose trainer hands the averager the poisoned tensors in place of its
pseudo-gradient; MeshAverager, the robust all-reduce and the coordinator client run as shipped,
exactly as a peer that computed a bad update would run them. The product CLI has no such switch.
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diloco import role  # noqa: E402
from peer.cli import main  # noqa: E402
from testing.poison import poison_tensors  # noqa: E402

ENV = "LOWBAND_TEST_POISON"
ATTACKS = ("flip", "huge", "nan")


def poisoned(attack: str, tensors: list[Tensor]) -> list[Tensor]:
    if attack == "nan":
        out = [t.clone() for t in tensors]
        out[0].view(-1)[0] = float("nan")
        return out
    return poison_tensors(attack, tensors)


class PoisoningAverager:
    """Wraps the role's averager: every average starts from the next attack's tensors."""

    def __init__(self, inner, attacks: list[str]) -> None:
        self.inner, self.attacks, self.calls = inner, attacks, 0

    def start(self, tensors: list[Tensor], tag: str, *, within_s: float | None = None) -> Future:
        attack = self.attacks[self.calls % len(self.attacks)]
        self.calls += 1
        print(f"poison: sending a {attack} pseudo-gradient for {tag}", flush=True)
        return self.inner.start(poisoned(attack, tensors), tag, within_s=within_s)

    def __getattr__(self, name: str) -> Any:  # group_size, last, cancel: the real averager's
        return getattr(self.inner, name)


def attacks_from_env() -> list[str]:
    attacks = os.environ.get(ENV, "").split(",")
    if not set(attacks) <= set(ATTACKS):
        raise SystemExit(f"{ENV} must name attacks out of {ATTACKS}, got {os.environ.get(ENV)!r}")
    return attacks


class PoisonedTrainRole(role.TrainRole):
    def _setup(self, answer: dict) -> None:
        super()._setup(answer)
        self.trainer.averager = PoisoningAverager(self.trainer.averager, attacks_from_env())


if __name__ == "__main__":
    attacks_from_env()
    role.TrainRole = PoisonedTrainRole  # what the `train` entry point loads in this process
    raise SystemExit(main())
