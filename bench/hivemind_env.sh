#!/bin/sh
# Creates bench/.venv-hivemind: the separate environment the hivemind anchor runs in.
# Separate because hivemind's 8-bit codecs need numpy<2 (with numpy 2 they fail to decode and
# the averager silently keeps local values -- docs/architecture.md §Measuring performance), while the project uses numpy 2.
# Idempotent: a stamp file records a finished install.  Usage: sh bench/hivemind_env.sh [python3]
set -eu
PYTHON="${1:-python3}"
VENV="$(cd "$(dirname "$0")" && pwd)/.venv-hivemind"
STAMP="$VENV/.hivemind-installed"
[ -f "$STAMP" ] && exit 0
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
# Keep the venv out of git even where the repo's .gitignore lacks it (as Python 3.13's venv does).
echo '*' > "$VENV/.gitignore"
# torch first (pinned) so pip takes the CPU build instead of a multi-GB CUDA one.
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q "numpy<2" hivemind==1.1.12
"$VENV/bin/python" -c "import hivemind, numpy; assert numpy.__version__ < '2', numpy.__version__"
touch "$STAMP"
