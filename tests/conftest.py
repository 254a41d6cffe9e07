"""Shared fixtures and the fast tier (`make test-fast`, ``pytest -m fast``).

The fast tier is pure unit tests, sans-IO protocol tests, codecs and model numerics: no child
processes, no sleeping. ``FAST_MODULES`` below names the modules in it; every test of a listed
module -- present and future -- is marked ``fast`` unless the module's entry excludes it by name
(with the reason) or it is marked ``slow``. Elsewhere a test joins with ``@pytest.mark.fast``.

The tier cannot rot silently: while a fast test (its fixtures included) runs, starting a process
or sleeping longer than ``FAST_MAX_SLEEP_S`` fails it, and an exclusion naming a test its module
no longer has is a collection error. `make test` runs everything, the fast tier included, with
the same guard.
"""
from __future__ import annotations

import _posixsubprocess
import asyncio
import os
import subprocess
import time
from collections.abc import Iterator

import pytest
from hypothesis import Phase, settings

from tests.harness import Procs

pytest_plugins = ["pytester"]  # tests/test_fast_tier.py runs the guard in inner sessions

# module -> {test function name: why it is not fast}
FAST_MODULES: dict[str, dict[str, str]] = {
    "test_fast_tier.py": {
        "test_guard_fails_processes_and_sleeps": "its inner session's unguarded test sleeps and spawns",
    },
    "test_codecs.py": {},
    "test_wire.py": {},
    "test_handshake.py": {},
    "test_credentials.py": {},
    "test_tokens.py": {},
    "test_data.py": {
        "test_tokenize_corpus_with_reference_tokenizer_is_cached": "the reference tokenizer over a corpus (~3 s CPU)",
    },
    "test_runs_api.py": {},
    "test_coordinator.py": {
        "test_cli_reports_unusable_data_dir": "runs the coordinator CLI as a process",
        "test_status_page_script_parses": "runs node",
    },
    "test_model.py": {
        "test_logits_match_transformers": "imports and runs transformers (~15 s)",
        "test_generate_matches_transformers_greedy": "imports and runs transformers",
        "test_three_stage_ranges_equal_full_model": "loads the reference model three more times",
        "test_malformed_files_raise_model_load_error": "~3 s CPU on the reference file; the tiny-model "
                                                       "loader cases in test_hostile_input.py stay fast",
    },
    "test_diloco.py": {
        "test_streaming_overlap_hides_average_latency": "times real sleeps standing in for compute",
        "test_heterogeneous_peers_finish_inner_phase_together": "times real sleeps standing in for compute",
    },
    "test_robust.py": {
        "test_result_is_the_honest_aggregate_bit_identical_everywhere": "peers are child processes",
        "test_offender_reported_by_id_and_reason_on_every_peer": "peers are child processes",
    },
    "test_hostile_input.py": {
        "test_coordinator_http_fuzz_never_5xx": "a real coordinator process",
        "test_coordinator_signed_bodies_with_hostile_fields": "a real coordinator process",
        "test_coordinator_survived_and_wrote_nothing_outside": "a real coordinator process",
        "test_peer_host_drops_garbage_and_keeps_serving": "a real PeerHost process",
    },
}
# Yielding to the event loop (sleep(0)) or a poll of a few ms is fine; waiting is not.
FAST_MAX_SLEEP_S = 0.01
# `make test-fast` loads this profile: a property that fails is reported at once, unshrunk
# (shrinking can take Hypothesis minutes); `make test` shrinks as usual.
settings.register_profile("fast-tier", phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target])


class FastTierViolation(AssertionError):
    """A test marked fast started a process or slept."""


@pytest.fixture
def procs():
    p = Procs()
    try:
        yield p
    finally:
        p.cleanup()


# tryfirst: the marks must be on before `-m fast` deselects.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    stale: set[str] = set()
    for item in items:
        module = item.path.name
        if module not in FAST_MODULES:
            continue
        # Checked on the module, not on the items: -k or a node id may have collected a few only.
        stale.update(f"{module}::{n}" for n in FAST_MODULES[module] if not hasattr(item.module, n))
        name = getattr(item, "originalname", item.name)
        if name not in FAST_MODULES[module] and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.fast)
    if stale:
        raise pytest.UsageError(f"tests/conftest.py FAST_MODULES excludes tests that do not exist: {sorted(stale)}")


class _Guard:
    """Patches process creation and sleeping while a fast test runs; records every violation
    (production code may swallow the exception raised at the call site)."""

    def __init__(self, nodeid: str) -> None:
        self.nodeid = nodeid
        self.violations: list[str] = []
        self._saved: list[tuple[object, str, object]] = []

    def _fail(self, what: str) -> FastTierViolation:
        self.violations.append(what)
        return FastTierViolation(f"{self.nodeid} is in the fast tier but {what}; move it out of the tier "
                                 f"(tests/conftest.py FAST_MODULES) or fake the time / process")

    def _patch(self, owner: object, attr: str, replacement: object) -> None:
        if hasattr(owner, attr):
            self._saved.append((owner, attr, getattr(owner, attr)))
            setattr(owner, attr, replacement)

    def __enter__(self) -> _Guard:
        real_time_sleep, real_async_sleep = time.sleep, asyncio.sleep

        def no_process(*args, **kwargs):
            raise self._fail("starts a process")

        def time_sleep(seconds: float) -> None:
            if seconds > FAST_MAX_SLEEP_S:
                raise self._fail(f"calls time.sleep({seconds})")
            real_time_sleep(seconds)

        async def async_sleep(delay: float, result=None):
            if delay > FAST_MAX_SLEEP_S:
                raise self._fail(f"calls asyncio.sleep({delay})")
            return await real_async_sleep(delay, result)

        self._patch(subprocess.Popen, "_execute_child", no_process)  # subprocess and asyncio
        self._patch(_posixsubprocess, "fork_exec", no_process)       # multiprocessing spawn
        for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
            self._patch(os, name, no_process)
        self._patch(time, "sleep", time_sleep)
        self._patch(asyncio, "sleep", async_sleep)
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, attr, original in reversed(self._saved):
            setattr(owner, attr, original)


def _guarded(item: pytest.Item) -> Iterator[None]:
    if item.get_closest_marker("fast") is None:
        return (yield)
    with _Guard(item.nodeid) as guard:
        result = yield
    if guard.violations:
        raise FastTierViolation(f"{item.nodeid} is in the fast tier but {'; '.join(guard.violations)}")
    return result


# Setup too: module-scoped fixtures are set up inside the first test that uses them.
@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    return (yield from _guarded(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    return (yield from _guarded(item))


async def echo(peer_id: str, header: dict, payload: bytearray):
    """An RPC handler that answers with what it got."""
    return header, payload


@pytest.fixture
async def hosts():
    """make(ip, limits, **kw) -> a started PeerHost (token mode) with an ``echo`` handler, one
    connection per peer unless ``kw`` says otherwise; every host made is closed at teardown."""
    from peer.identity import Identity
    from peer.transport import PeerHost

    made: list = []

    async def make(ip: str = "127.0.0.1", limits=None, **kw):
        kw.setdefault("conns_per_peer", 1)
        host = PeerHost(Identity.generate(), HOSTS_TOKEN, limits=limits, **kw)
        made.append(host)
        await host.start(ip, 0)
        host.handle("echo", echo)
        return host

    yield make
    for host in made:
        await host.close()


HOSTS_TOKEN = b"swarm-token-b94de711f24b1b117b1e35ebf8e6f5a3301e96dc"  # tests/transport_child.py's default
