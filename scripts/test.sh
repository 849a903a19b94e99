#!/usr/bin/env bash
# The full test suite: sets up .venv/ (scripts/setup.sh), makes sure a PostgreSQL server is installed for the
# distributed-search tests (they start their own throwaway cluster), then runs pytest; then runs the tests again
# (all but the real-model, PostgreSQL and long search ones) under the oldest transformers dfsmerge supports, 4.57
# (pyproject.toml: transformers>=4.57,<6; llama.cpp's tools pin it), in a second environment .venv-tf4/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q postgresql >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q postgresql >/dev/null; }) \
    || echo "warning: could not install postgresql; the PostgreSQL tests will be skipped"
fi
if [ ! -x .venv-tf4/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv-tf4
fi
pip4() { .venv-tf4/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
pip4 install "torch==2.13.0"  # first and pinned, as in scripts/setup.sh
pip4 install -e ".[search,gguf,test]" "transformers~=4.57.0"
status=0
.venv/bin/python -m pytest -q "$@" || status=$?
echo "--- again under transformers $(.venv-tf4/bin/python -c 'import transformers; print(transformers.__version__)')"
# not again: the search-quality and Optuna-storage tests (they exercise CMA-ES and Optuna, not transformers, and
# take most of the suite's time); test_families.py's search tests run the search path under 4.57
.venv-tf4/bin/python -m pytest -q -m "not real_model and not postgres" \
  --deselect tests/test_evolve.py::test_the_search_finds_a_planted_recipe \
  --deselect tests/test_evolve.py::test_resume_after_sigkill_in_the_last_trial \
  --deselect tests/test_evolve.py::test_two_workers_share_one_sqlite_study "$@" || status=$?
exit $status
