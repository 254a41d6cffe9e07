"""testing.links and the all-reduce anchors: link kinds give the rates they promise, clean up after
themselves, and the anchors run and verify their results (small tensors; the timed 100 MB runs
belong to `make bench`). Namespace tests need root (CI is root) and are skipped otherwise."""
from __future__ import annotations

import subprocess
import sys

import pytest

from testing.baselines.gloo_allreduce import run_gloo
from testing.baselines.hivemind_allreduce import VENV_PYTHON, run_hivemind
from testing.links import LinksError, LinksUnsupported, measure_link_rate, open_links, ring_lower_bound_s
from testing.netns import unavailable_reason

_NETNS = unavailable_reason(need_nft=False)
needs_netns = pytest.mark.skipif(_NETNS is not None, reason=_NETNS or "")
NOMINAL = 100e6 / 8


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=15).stdout


def test_loopback_routes_processes_and_cleanup():
    with open_links("loopback", 3) as links:
        assert [links.address(i) for i in range(3)] == ["127.0.0.11", "127.0.0.12", "127.0.0.13"]
        routes = links.routes([5001, 5002, 5003])
        assert routes[0] == [None, "127.0.0.12:5002", "127.0.0.13:5003"]
        assert measure_link_rate(links) > 100e6  # unshaped: far beyond any shaped rate
        child = links.start(2, [sys.executable, "-c", "import time; print('READY {}', flush=True); time.sleep(60)"])
        assert child.tagged("READY", 30) == {}
    assert child.proc.poll() is not None, "host processes must be killed when the links close"


def test_bad_arguments():
    with pytest.raises(ValueError):
        open_links("carrier-pigeon", 2)
    with pytest.raises(ValueError):
        open_links("loopback", 1)
    with open_links("loopback", 2) as links:
        with pytest.raises(ValueError):
            links.routes([1])
        with pytest.raises(ValueError):
            links.address(2)
        failing = links.start(0, [sys.executable, "-c", "raise SystemExit(3)"])
        with pytest.raises(LinksError):
            failing.tagged("READY", 30)
    assert ring_lower_bound_s(4, 100e6, 12.5e6) == pytest.approx(12.0)
    with pytest.raises(ValueError):
        ring_lower_bound_s(1, 100e6, 12.5e6)


@pytest.mark.root
@needs_netns
def test_tbf100_rate_and_cleanup():
    with open_links("tbf100", 2) as links:
        names = links.describe()["namespaces"]
        assert all(name in namespaces() for name in names)
        assert links.address(0).startswith("10.77.0.")
        rate = measure_link_rate(links, seconds=1.0)
    print("tbf100 measured", rate * 8 / 1e6, "Mbit/s")
    # TCP goodput under a 100 Mbit/s tbf: ~95.6 Mbit/s (headers), never above the rate.
    assert 0.85 * NOMINAL <= rate <= 1.01 * NOMINAL
    listed = namespaces()
    assert not any(name in listed for name in names), "namespaces left behind"


def test_emu100d25_routes_through_relays_at_the_link_rate():
    with open_links("emu100d25", 2) as links:
        routes = links.routes([6001, 6002])
        assert routes[0][1] != f"{links.address(1)}:6002" and routes[0][1] != routes[1][0]
        rate = measure_link_rate(links, seconds=1.0)
    print("emu100d25 measured", rate * 8 / 1e6, "Mbit/s")
    assert 0.8 * NOMINAL <= rate <= 1.05 * NOMINAL


def test_gloo_anchor_verifies_its_sum():
    with open_links("loopback", 2) as links:
        result = run_gloo(links, numel=1000, repeats=1, timeout=120)
    assert result["verified"] and len(result["samples"]) == 1 and result["median"] > 0


def test_anchors_refuse_relayed_links():
    with open_links("emu100d25", 2) as links:
        with pytest.raises(LinksUnsupported):
            run_gloo(links, numel=10, repeats=1)
        with pytest.raises(LinksUnsupported):
            run_hivemind(links, numel=10, repeats=1)


@pytest.mark.slow
@pytest.mark.skipif(not VENV_PYTHON.exists(), reason="no bench/.venv-hivemind (sh bench/hivemind_env.sh)")
def test_hivemind_anchor_averages_by_value():
    with open_links("loopback", 2) as links:
        result = run_hivemind(links, numel=4096, codecs=("fp32", "8bit"), repeats=2, warmup=0, timeout=240)
    assert result["numpy"].startswith("1.")  # its 8-bit codecs fail silently under numpy 2
    for codec in ("fp32", "8bit"):
        assert result["codecs"][codec]["verified_rounds"] >= 1 and result["codecs"][codec]["median"] > 0
