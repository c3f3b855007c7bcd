#!/usr/bin/env bash
# The test command behind `make test`: the unit tests, then every notebook under nbval
# (each executed with its small defaults; outputs sanitized by tests/nbval_sanitize.cfg).
# pytest's exit code 5 ("no tests collected") counts as success, any other non-zero fails.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=.venv/bin/python

run_pytest() {
  "$python" -m pytest "$@"
  local rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "pytest: no tests collected for: $*" >&2
    rc=0
  fi
  return "$rc"
}

status=0
run_pytest -q tests || status=1
# The notebooks share runs/notebooks/seed_42 (their default run_dir) and skip finished stages;
# start it empty so nbval exercises the current code, not results of an earlier checkout.
if [ -d runs/notebooks ]; then
  echo "nbval: clearing runs/notebooks (scratch run folder of the notebooks' defaults)" >&2
  rm -rf runs/notebooks
fi
run_pytest -q --nbval-lax --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg \
  notebooks || status=1
exit "$status"
