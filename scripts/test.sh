#!/usr/bin/env bash
# The full test suite: sets up .venv/ (scripts/setup.sh), makes sure a PostgreSQL server is installed for the
# distributed-search tests (they start their own throwaway cluster), then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q postgresql >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q postgresql >/dev/null; }) \
    || echo "warning: could not install postgresql; the PostgreSQL tests will be skipped"
fi
exec .venv/bin/python -m pytest -q "$@"
