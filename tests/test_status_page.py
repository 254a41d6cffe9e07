"""The status page in a real browser.

Headless Chromium (Debian packages chromium + chromium-driver, installed here with apt-get when
missing; the test is skipped with the reason only if that fails) loads the page from a live
`coordinator start` process with three real `peer join` daemons (one then killed -9, so the page
shows a dead peer and the others' measured link matrix) plus simulated trainers and model servers
that drive the real HTTP API (tests/swarm_feed.py: a 12-step run with losses, hash agreement and
a checkpoint; two servers leaving blocks 24-29 uncovered). The assertions read values that only
the page's JavaScript fills in, and the screenshot is saved to bench/results/status_page.png,
the reference image the README points to.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from testing.api import SignedApi, operator_api
from tests import swarm_feed
from tests.harness import ROOT, Procs, wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOT = ROOT / "bench" / "results" / "status_page.png"
TOKEN = "status-page-token-f0d850af6eb423f9a519db90d940852fd4e3fe68"
STEPS = 12
INTERVAL, TIMEOUT = 0.5, 3.0
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-quic", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,900")

pytestmark = pytest.mark.slow


def ensure_chromium() -> None:
    """Install Debian's chromium + chromium-driver when missing (root only); skip if impossible."""
    if Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists():
        return
    if getattr(os, "geteuid", lambda: 1)() != 0 or shutil.which("apt-get") is None:
        pytest.skip("chromium/chromedriver missing and cannot apt-get install them (needs root + apt)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]
    result = subprocess.run(install, capture_output=True, text=True, timeout=900, env=env)
    if result.returncode != 0:  # stale package lists: refresh once and retry
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=600, env=env)
        result = subprocess.run(install, capture_output=True, text=True, timeout=900, env=env)
    if result.returncode != 0 or not Path(CHROMEDRIVER).exists():
        pytest.skip(f"apt-get install chromium chromium-driver failed: {result.stderr[-500:]}")


OPERATORS: dict[str, SignedApi] = {}  # coordinator URL -> an operator (links, addresses)


def status(url: str) -> dict:
    return OPERATORS[url].get("/status")


class SimulatedSwarm:
    """swarm_feed's simulated peers on an event loop in a background thread (Selenium is sync)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.peers: list[swarm_feed.SimPeer] = []

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def stop_all() -> None:
            for p in self.peers:
                await p.stop()
        self.run(stop_all(), 30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def chrome(tmp_path: Path, monkeypatch):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium-manager must never download anything
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chrome-profile'}")
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def test_status_page_in_headless_chromium(procs: Procs, tmp_path, monkeypatch):
    ensure_chromium()
    coord = procs.python("-m", "coordinator", "start", "--port", "0", "--data-dir", str(tmp_path / "c"),
                         "--token", TOKEN, "--heartbeat-interval", str(INTERVAL),
                         "--peer-timeout", str(TIMEOUT))
    url = coord.ready["url"]
    OPERATORS[url] = operator_api(url, tmp_path / "c")
    daemons = [procs.python("-m", "peer.cli", "join", "--coordinator", url, "--token", TOKEN,
                            "--listen", "127.0.0.1:0", "--key", str(tmp_path / f"p{i}.key"),
                            "--device", "cpu", "--ping-interval", "0.5") for i in range(3)]
    swarm = SimulatedSwarm()
    try:
        swarm.peers += swarm.run(swarm_feed.start_servers(url, TOKEN, INTERVAL))
        swarm.peers += swarm.run(swarm_feed.train(url, TOKEN, STEPS, INTERVAL))
        real = {d.ready["peer_id"] for d in daemons}

        def meshed() -> bool:
            rows = status(url)["links"]["rows"]
            return all(len([v for v in rows.get(p, {}).values() if v["ping_rtt_s"]]) == 2 for p in real)

        wait_until(meshed, 60, "the three daemons to measure their links")
        victim = daemons[2]
        victim.kill()  # SIGKILL: no leave, the failure detector must declare it dead
        wait_until(lambda: any(p["peer_id"] == victim.ready["peer_id"] and p["state"] == "dead"
                               for p in status(url)["peers"]), 30, "the killed peer to be dead")
        api = status(url)
        live = sum(api["counts"][s] for s in ("joining", "active", "suspect"))
        assert live == 2 + 2 + 2 and api["counts"]["dead"] == 1

        driver = chrome(tmp_path, monkeypatch)
        try:
            driver.get(url + "/")
            from selenium.webdriver.common.by import By

            def page_ready():
                plots = driver.find_elements(By.CSS_SELECTOR, "svg.loss-plot path.loss-line")
                return (driver.find_element(By.ID, "peer-count").text == str(live)
                        and plots and plots[0].get_attribute("data-points") == str(STEPS)
                        and driver.find_elements(By.CSS_SELECTOR, "#peers td.state-dead"))

            wait_until(page_ready, 30, "the page's JavaScript to render the swarm")
            states = [td.text for td in driver.find_elements(By.CSS_SELECTOR, "#peers td.state")]
            assert sorted(states) == sorted(["active"] * live + ["dead"])
            assert driver.find_element(By.ID, "count-dead").text == "1"

            line = driver.find_element(By.CSS_SELECTOR, "svg.loss-plot path.loss-line")
            assert line.get_attribute("d").count("L") == STEPS - 1
            assert float(line.get_attribute("data-last-loss")) == pytest.approx(swarm_feed.loss_at(STEPS) + 0.025)
            run_card = driver.find_element(By.CSS_SELECTOR, f".run[data-run-id='{swarm_feed.RUN}']")
            assert "agreed" in run_card.text and str(STEPS) in run_card.text

            model = driver.find_element(By.CSS_SELECTOR, f".model[data-model='{swarm_feed.MODEL}']")
            assert len(model.find_elements(By.CSS_SELECTOR, ".block.gap")) == 6
            assert "gaps: blocks 24\u201329" in model.text

            matrix_rows = driver.find_elements(By.CSS_SELECTOR, "#link-matrix tbody tr")
            assert len(matrix_rows) >= 2
            ckpt = driver.find_element(By.CSS_SELECTOR, "#checkpoints tbody").text
            assert swarm_feed.RUN in ckpt and str(STEPS) in ckpt

            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            # The whole page in one image: a viewport as tall as the content (window sizes are
            # clamped to the headless screen, the emulated viewport is not).
            height = int(driver.execute_script("return document.documentElement.scrollHeight"))
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
                "width": 1400, "height": min(height, 4000), "deviceScaleFactor": 1, "mobile": False})
            assert driver.save_screenshot(str(SCREENSHOT))
            assert SCREENSHOT.stat().st_size > 10_000
        finally:
            driver.quit()
    finally:
        swarm.close()
