#!/usr/bin/env bash
# The README's first command: set up .venv and serve the API on 127.0.0.1:8000 (the demo model
# unless KITSEG_CHECKPOINT names a checkpoint). Open http://127.0.0.1:8000/docs.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
exec kitseg-serve --host "${KITSEG_HOST:-127.0.0.1}" --port "${KITSEG_PORT:-8000}"
