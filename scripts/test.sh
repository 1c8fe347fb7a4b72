#!/usr/bin/env bash
# The README's test command: set up .venv, lint, type-check, run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
ruff check segcore training app tests benchmarks
ruff format --check segcore training app tests benchmarks
mypy
hadolint Dockerfile
check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml scripts/docker-compose.smoke.yml
python -m pytest -q -ra "$@"
