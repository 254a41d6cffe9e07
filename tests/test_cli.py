"""The `peer` and `coordinator` commands as a user meets them: help and quick commands load no
heavy module, every option shows help and its default, the shared flags are everywhere they
belong, role flags without their role are an error; and the progress helper they log through."""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time

import pytest

from peer import progress
from peer.progress import Progress, bars_enabled, waiting
from peer.runtime import JsonLogFormatter
from tests.harness import ROOT

# What `peer --help` must not load: torch (role plug-ins, ~1.5 s), the HTTP stack and the
# transport (only `peer join` / `peer status` need them when they run).
HEAVY = ("torch", "aiohttp", "peer.transport", "peer.daemon", "diloco.role", "pipeline.server",
         "numpy", "coordinator.app")

# Runs one command's main() in a fresh interpreter and prints which HEAVY modules it loaded.
PROBE = """
import json, sys
module, argv, heavy = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
main = __import__(module, fromlist=["main"]).main
try:
    code = main(argv)
except SystemExit as e:
    code = e.code
print("LOADED " + json.dumps([m for m in heavy if m in sys.modules]), file=sys.stderr)
sys.exit(code)
"""


def probe(module: str, argv: list[str]) -> tuple[int, str, str, list[str]]:
    """(exit status, stdout, stderr, the HEAVY modules loaded) of ``module``'s main(argv)."""
    r = subprocess.run([sys.executable, "-c", PROBE, module, json.dumps(argv), json.dumps(HEAVY)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("LOADED ")]
    assert line, r.stderr
    return r.returncode, r.stdout, r.stderr, json.loads(line[-1][7:])


@pytest.mark.parametrize("module, argv", [
    ("peer.cli", ["--help"]),
    ("peer.cli", ["join", "--help"]),
    ("peer.cli", ["generate", "--help"]),
    ("coordinator.cli", ["--help"]),
    ("coordinator.cli", ["start", "--help"]),
])
def test_help_loads_no_heavy_module(module, argv):
    code, out, _, loaded = probe(module, argv)
    assert code == 0 and "usage:" in out
    assert loaded == [], f"{module} {' '.join(argv)} imported {loaded}"


def test_peer_id_loads_no_heavy_module(tmp_path):
    code, out, _, loaded = probe("peer.cli", ["id", "--key", str(tmp_path / "k")])
    assert code == 0 and len(out.strip()) == 40
    assert loaded == []


def test_peer_status_loads_no_heavy_module():
    # nothing listens on port 9 (discard) of 127.0.0.1: the coordinator is unreachable (the
    # table itself is checked against a live coordinator in tests/test_join.py)
    code, _, err, loaded = probe("peer.cli", ["status", "--coordinator", "http://127.0.0.1:9"])
    assert code == 1 and "unreachable" in err
    assert loaded == []


def parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """Every parser of both commands, subcommands (and theirs) included, with its name."""
    from coordinator.cli import build_parser as coordinator_parser
    from peer.cli import build_parser as peer_parser

    out, todo = [], [("peer", peer_parser()), ("coordinator", coordinator_parser())]
    while todo:
        name, parser = todo.pop()
        out.append((name, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo.extend((f"{name} {sub}", p) for sub, p in action.choices.items())
    return out


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.option_strings[0] if a.option_strings else a.dest: a for a in parser._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))}


def test_every_option_has_help_and_shows_its_default():
    missing = []
    for name, parser in parsers():
        formatter = parser._get_formatter()
        for flag, action in options(parser).items():
            text = formatter._get_help_string(action) if action.help else ""
            if not text:
                missing.append(f"{name} {flag}: no help")
            elif not (action.required or action.default is False or "default" in text):
                missing.append(f"{name} {flag}: no default shown ({text!r})")
    assert missing == []


def test_train_flags_show_the_run_config_defaults():
    from diloco.run_spec import RunConfig
    from peer.cli import build_parser

    join = build_parser()._subparsers._group_actions[0].choices["join"]
    helps = {a.option_strings[0]: a.help for a in join._actions if a.option_strings}
    assert f"(default: {RunConfig.inner_steps})" in helps["--inner-steps"]
    assert f"(default: {RunConfig.outer_lr:g})" in helps["--outer-lr"]
    assert f"(default: {RunConfig.codec})" in helps["--codec"]


def test_shared_flags_are_on_every_command_that_needs_them():
    by_name = dict(parsers())
    for name in ("peer join", "peer gateway", "peer generate", "coordinator start",
                 "coordinator checkpoints export"):
        assert {"--log-format", "--log-level"} <= set(options(by_name[name])), name
    for name, parser in by_name.items():
        if "--token" in options(parser):
            assert "--token-file" in options(parser), name
    # Every command that talks to a coordinator takes the same admission flags
    # (peer/runtime.py add_coordinator_args).
    for name in ("peer join", "peer status", "peer generate", "peer gateway"):
        assert {"--coordinator", "--join", "--join-file", "--insecure"} <= set(options(by_name[name])), name


def test_train_flags_reach_the_role_only_with_train(capsys):
    from diloco.train_options import TrainOptions
    from peer.cli import build_parser, main

    base = ["join", "--coordinator", "http://127.0.0.1:9", "--key", "/nonexistent/k"]
    assert main([*base, "--inner-steps", "5", "--zstd"]) == 2
    err = capsys.readouterr().err
    assert "--inner-steps, --zstd are train role options; add --train" in err
    assert main([*base, "--blocks", "0:4"]) == 2
    assert "--blocks is a serve role option; add --serve MODEL" in capsys.readouterr().err

    args = build_parser().parse_args([*base, "--train", "r", "--inner-steps", "5", "--codec", "int4"])
    values = {a.dest: getattr(args, a.dest) for a in args.role_actions["train"]}
    assert TrainOptions.from_options(values).config == {"inner_steps": 5, "codec": "int4"}


def test_train_role_entry_points_resolve():
    """The light flags module and the heavy role are both reachable through entry points."""
    from peer.roles import ENTRY_POINT_GROUP, OPTIONS_GROUP, plugin_entry_points

    assert {ep.name: ep.value for ep in plugin_entry_points(OPTIONS_GROUP)}["train"] == \
        "diloco.train_options:add_arguments"
    roles = {ep.name: ep for ep in plugin_entry_points(ENTRY_POINT_GROUP)}
    assert set(roles) >= {"train", "serve"}
    assert roles["train"].load().__name__ == "TrainRole"


# -- progress ----------------------------------------------------------------------------------
def test_progress_logs_lines_without_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="lowband.progress")
    with Progress("fetch", total=4096, min_wait_s=0, log_every_s=0) as p:
        p.update(1024)
        p.update(1024)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("fetch: 1.0 KiB of 4.0 KiB (25%)")
    assert lines[1].startswith("fetch: 2.0 KiB of 4.0 KiB (50%)")
    assert lines[-1].startswith("fetch: done after")


def test_short_waits_stay_silent(caplog):
    caplog.set_level(logging.INFO, logger="lowband.progress")
    with Progress("quick", total=10, unit="items") as p:
        p.update(10)
    assert caplog.records == []


def test_indeterminate_wait_logs_elapsed_time_and_failure(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="lowband.progress")
    monkeypatch.setattr(progress, "_TICK_S", 0.01)
    with pytest.raises(RuntimeError):
        with waiting("download", min_wait_s=0, log_every_s=0):
            for _ in range(500):  # until the ticker has logged once (bounded: 5 s at most)
                if caplog.records:
                    break
                time.sleep(0.01)
            raise RuntimeError("boom")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("download: ") and lines[0].endswith("s")
    assert lines[-1].startswith("download: failed after")


def test_bars_only_on_a_terminal_with_text_logs(monkeypatch):
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [logging.StreamHandler(sys.stderr)])
    monkeypatch.setattr(sys, "stderr", type("Tty", (), {"isatty": lambda self: True})())
    assert bars_enabled()
    root.handlers[0].setFormatter(JsonLogFormatter())
    assert not bars_enabled()
    monkeypatch.setattr(sys, "stderr", type("Pipe", (), {"isatty": lambda self: False})())
    root.handlers[0].setFormatter(logging.Formatter())
    assert not bars_enabled()


# -- --log-format json, end to end -------------------------------------------------------------
def test_json_logs_are_one_object_per_line_per_step_lines_included(procs, tmp_path):
    """A coordinator and a training peer under --log-format json: apart from the READY line,
    everything they write is one JSON object per line, the per-outer-step lines included."""
    from tests.harness import start_coordinator

    token = "json-token-0d6c4b2a98e7f5d3c1b0a9f8e7d6c5b4a3"
    coord = start_coordinator(procs, tmp_path / "coord", token, "--log-format", "json")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the peer trains a model over the mesh, one outer step at a time.\n" * 400)
    peer = procs.python("-m", "peer.cli", "join", "--coordinator", coord.ready["url"],
                        "--token", token, "--listen", "127.0.0.1:0",
                        "--key", str(tmp_path / "p.key"), "--device", "cpu", "--log-format", "json",
                        "--train", "j", "--data", str(corpus), "--preset", "micro",
                        "--inner-steps", "2", "--seq-len", "16", "--batch-size", "2",
                        "--outer-steps", "1")
    peer.wait_for_line("train j: done at step 1", timeout=120)
    for child in (coord, peer):
        lines = [line for line in list(child.lines) if line.strip() and not line.startswith("READY ")]
        entries = [json.loads(line) for line in lines]  # raises on any line that is not JSON
        assert all(isinstance(e, dict) and {"ts", "level", "logger", "msg"} <= set(e) for e in entries)
    msgs = [json.loads(line)["msg"] for line in peer.lines if line.startswith("{")]
    assert any(m.startswith("train j: step 1 loss") for m in msgs), msgs
    assert any(m.startswith("peer id: ") for m in msgs)
