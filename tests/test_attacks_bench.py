"""Keeps bench/attacks.py from rotting: a few fast attacks of testing/attacks.py against a live
open swarm (a real `coordinator start --open` and three `peer join --train` processes), each
checked for the result schema the bench's table reads and for being defended; and the harness's
own rule that an attack that errors is reported as not defended."""
from __future__ import annotations

import asyncio

import pytest

from testing.attacks import (ATTACKS, LiveSwarm, bearer_token, outcome, replayed_request,
                             run_attack, status_scraping, token_oracle)

KEYS = {"attack", "expected", "observed", "defended", "detail"}


@pytest.fixture
def target(procs, tmp_path):
    swarm = LiveSwarm(procs, tmp_path)
    target = swarm.start(3)
    swarm.wait_training(target, steps=1)
    return target


def test_fast_attacks_against_a_live_open_swarm_are_defended(target):
    async def run() -> list[dict]:
        return [await run_attack(fn, target, True) for fn in
                (replayed_request, bearer_token, status_scraping, token_oracle)]

    results = asyncio.run(run())
    for r in results:
        assert set(r) == KEYS, r
        assert isinstance(r["defended"], bool) and isinstance(r["detail"], dict)
        assert r["attack"] and r["expected"] and r["observed"]
        assert r["defended"], r
    # the oracle saw the handshake it needs to tell a defence from a broken probe
    assert "'AUTH'" in results[3]["observed"].split("right token:")[1]


def test_an_attack_that_errors_is_not_defended(tmp_path):
    async def broken(target, quick):
        raise ConnectionRefusedError("nothing listens there")

    async def slow(target, quick):
        await asyncio.sleep(10)

    errored = asyncio.run(run_attack(broken, None, True))
    assert set(errored) == KEYS and errored["defended"] is False
    assert "ConnectionRefusedError" in errored["observed"]
    hung = asyncio.run(run_attack(slow, None, True, timeout=0.2))
    assert hung["defended"] is False and "TimeoutError" in hung["observed"]
    assert outcome("a", "b", "c", 1)["defended"] is True


def test_every_attack_is_registered():
    assert len(ATTACKS) == 19 and len({name for name, _, _ in ATTACKS}) == 19
    assert {needs for _, _, needs in ATTACKS} == {True, False}
