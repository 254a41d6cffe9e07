"""Test and benchmark support: what tests/ and bench/ both use, kept out of the product packages.

Real-process harness (``procs``), the training swarm and churn scenario (``swarm``, ``churn``),
the link emulator and network-namespace lab (``netem``, ``netns``), N-host link kinds
(``links``), all-reduce anchors (``baselines``), and the oracles and generators shared by the
hostile-input tests and the fuzz bench (``fuzzgen``, ``wire_oracles``, ``hostile``,
``tiny_model``, ``poison``). Not part of the installed wheel (pyproject.toml lists the product
packages only); tests and benches run with the repository root on ``sys.path``.

Top level imports only the standard library: the hivemind anchor's workers import this package
under bench/.venv-hivemind, which has none of the project's dependencies.
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
