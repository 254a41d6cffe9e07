"""The fast tier's guard (tests/conftest.py): a fast test that starts a process or sleeps fails,
even when the code under test swallows the error; the tier membership comes from FAST_MODULES,
and an exclusion naming a test that no longer exists stops the run. Each case is a small pytest
session run in-process on the real hooks."""
from __future__ import annotations

import pytest

from tests import conftest

INNER_ARGS = ("-p", "no:cacheprovider", "-o", "asyncio_default_fixture_loop_scope=function")
INNER_CONFTEST = """
from tests.conftest import pytest_collection_modifyitems, pytest_runtest_call, pytest_runtest_setup
"""

INNER_TESTS = """
import asyncio
import multiprocessing
import subprocess
import time

import pytest


@pytest.fixture(scope="module")
def child():
    return subprocess.run(["true"], timeout=30).returncode


@pytest.mark.fast
def test_sleeps():
    time.sleep(0.2)


@pytest.mark.fast
def test_swallowed_process():
    try:
        subprocess.run(["true"], timeout=30)
    except Exception:
        pass


@pytest.mark.fast
def test_async_sleep():
    asyncio.run(asyncio.sleep(0.2))


@pytest.mark.fast
def test_multiprocessing():
    p = multiprocessing.get_context("spawn").Process(target=print)
    p.start()
    p.join(30)


@pytest.mark.fast
def test_fixture_starts_a_process(child):
    pass


@pytest.mark.fast
def test_yields_and_polls_briefly():
    time.sleep(0)
    time.sleep(0.005)
    asyncio.run(asyncio.sleep(0))


def test_not_fast_may_sleep_and_spawn():
    time.sleep(0.05)
    assert subprocess.run(["true"], timeout=30).returncode == 0
"""


@pytest.fixture
def inner(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(INNER_CONFTEST)
    return pytester


def test_guard_fails_processes_and_sleeps(inner: pytest.Pytester) -> None:
    inner.makepyfile(test_inner=INNER_TESTS)
    result = inner.runpytest_inprocess(*INNER_ARGS)
    outcomes = {r.nodeid.split("::")[-1]: r.outcome for r in result.reprec.getreports("pytest_runtest_logreport")
                if r.when == "call" or r.outcome == "failed"}
    assert outcomes == {"test_sleeps": "failed", "test_swallowed_process": "failed", "test_async_sleep": "failed",
                        "test_multiprocessing": "failed", "test_fixture_starts_a_process": "failed",
                        "test_yields_and_polls_briefly": "passed", "test_not_fast_may_sleep_and_spawn": "passed"}
    result.stdout.fnmatch_lines(["*test_swallowed_process is in the fast tier but starts a process*"])


def test_listed_modules_are_fast_except_named_tests(inner: pytest.Pytester,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(conftest.FAST_MODULES, "test_listed.py", {"test_excluded": "sleeps on purpose"})
    inner.makepyfile(test_listed="""
import time
import pytest

def test_included():
    pass

def test_excluded():
    time.sleep(0.05)

@pytest.mark.slow
def test_slow():
    pass
""")
    result = inner.runpytest_inprocess(*INNER_ARGS, "-m", "fast", "-q")
    result.assert_outcomes(passed=1, deselected=2)


def test_stale_exclusion_is_an_error(inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(conftest.FAST_MODULES, "test_listed.py", {"test_renamed_away": "why"})
    inner.makepyfile(test_listed="def test_other():\n    pass\n")
    result = inner.runpytest_inprocess(*INNER_ARGS)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*excludes tests that do not exist*test_listed.py::test_renamed_away*"])
