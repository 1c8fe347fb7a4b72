#!/usr/bin/env bash
# The README's test command: set up .venv, lint, type-check, run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
ruff check segcore training app tests benchmarks
ruff format --check segcore training app tests benchmarks
mypy
python -m pytest -q -ra "$@"
