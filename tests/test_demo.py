"""`make demo` (deploy/demo.py) as a real run: a coordinator, three training peers, three serving
peers, all real processes on 127.0.0.1, in a short configuration (the `micro` preset, 2-second
inner phases, a few generated tokens). The demo's own output is the oracle: outer steps with
agreeing hashes, a falling loss, a saved checkpoint, a generated answer; and afterwards none of
the processes it printed a pid for may still run."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = [sys.executable, str(ROOT / "deploy" / "demo.py")]
SHORT = ["--preset", "micro", "--train-minutes", "0.3", "--inner-seconds", "2",
         "--checkpoint-every", "2", "--max-new-tokens", "8"]


def start(args: list[str], workdir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([*DEMO, *args, "--workdir", str(workdir)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, timeout: float) -> str:
    """The demo's output once it exits; past ``timeout`` it gets SIGTERM (it cleans up), then SIGKILL."""
    try:
        out, _ = proc.communicate(timeout=timeout)
        return out
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail(f"demo ran over {timeout:.0f}s; output:\n{out[-6000:]}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is not running.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def assert_nothing_left(out: str) -> None:
    pids = {int(p) for p in re.findall(r"\bpid (\d+)\b", out)}
    assert len(pids) >= 2, out
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    assert not [p for p in pids if alive(p)], f"left running: {[p for p in pids if alive(p)]}\n{out}"


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_demo_trains_checkpoints_and_serves(tmp_path):
    t0 = time.monotonic()
    proc = start(SHORT, tmp_path / "demo")
    out = finish(proc, 420)
    assert proc.returncode == 0, out
    assert re.search(r"status page: http://127\.0\.0\.1:\d+/", out), out
    steps = re.findall(r"step +(\d+) \|.*\| same hash [0-9a-f]{12} on all 3", out)
    assert len(steps) >= 2 and steps[:2] == ["1", "2"], out
    assert re.search(r"loss \(mean over peers\): [\d.]+ at step 1 -> [\d.]+ at step \d+ \(-\d+%\)", out), out
    ckpt = re.search(r"checkpoint saved: step (\d+), .* = the hash every peer reported", out)
    assert ckpt and int(ckpt.group(1)) % 2 == 0, out
    assert (tmp_path / "demo" / "coordinator").is_dir()
    answer = re.search(r"answer: (.+)", out)
    assert answer and answer.group(1).strip(), out
    assert re.search(r"route: client -> serve0 .*\[0:10\) -> serve1 .*\[10:20\) -> serve2 .*\[20:30\)", out), out
    assert "stopped 4 processes by pid (all exited 0)" in out and "demo OK" in out, out
    assert_nothing_left(out)
    print(f"demo (short configuration) in {time.monotonic() - t0:.0f}s")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_mid_training_stops_every_process(tmp_path):
    proc = start([*SHORT, "--train-minutes", "10", "--skip-serve"], tmp_path / "demo")
    lines = []
    assert proc.stdout is not None
    try:
        deadline = time.monotonic() + 240
        for line in proc.stdout:
            lines.append(line)
            if re.search(r"step +1 \|", line) or time.monotonic() > deadline:
                break
        assert any(re.search(r"step +1 \|", line) for line in lines), "".join(lines)
        proc.send_signal(signal.SIGTERM)
        out = "".join(lines) + finish(proc, 120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out
    assert "interrupted; shutting everything down" in out and "stopped 4 processes by pid" in out, out
    assert_nothing_left(out)


def test_refuses_a_foreign_workdir(tmp_path):
    (tmp_path / "precious.txt").write_text("not the demo's")
    proc = start(["--skip-train", "--skip-serve"], tmp_path)
    out = finish(proc, 60)
    assert proc.returncode == 1 and "is not empty and not a demo work dir" in out, out
    assert (tmp_path / "precious.txt").read_text() == "not the demo's"
