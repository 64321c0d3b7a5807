#!/usr/bin/env bash
# One GPU check: every GPU-only path of distthink, as independent steps with time limits, one JSON summary.
#   scripts/gpu_check.sh [--out gpu_check.json] [--budget-s 480] [--only A,B] [--skip C] [--workdir DIR]
#   scripts/gpu_check.sh --dry-run     # CPU: every step starts
#   scripts/gpu_check.sh --list        # steps, limits, expected durations
# The steps live in scripts/gpu_check.py (see its docstring). Runs the package from this checkout with python3.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" "$ROOT/scripts/gpu_check.py" "$@"
