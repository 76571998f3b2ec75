#!/usr/bin/env bash
# Installs the test dependencies, then runs the linter and the whole test suite (CI), or with --quick only the unit
# tier (pure logic, a few minutes); other arguments go to pytest.
# The browser test drives Debian's Chromium through Playwright (the PyPI package); no browser is
# downloaded by Playwright itself.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=(); else SUDO=(sudo); fi
  "${SUDO[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq chromium >/dev/null
fi
python3 -m pip install --quiet torch==2.13.0 -r requirements-dev.txt
python3 -m ruff check .
# Two workers (pytest-xdist): the tests that start processes of their own on one, the rest on the other as it frees
# up (tests/conftest.py, xdist_group). `-n 0` as an argument runs everything in this process.
if [ "${1:-}" = "--quick" ]; then
  shift
  exec python3 -m pytest -q -n 2 --dist loadgroup -m unit "$@"
fi
status=0
# The 40 slowest tests are listed, so a change that costs the suite its budget shows where.
python3 -m pytest -q -n 2 --dist loadgroup -m "not alone" --durations=40 "$@" || status=$?
# Then the tests that time a promise to the user, with the machine to themselves (5: none of them was asked for).
python3 -m pytest -q -m alone "$@" || { code=$?; [ "$code" = 5 ] || status=$code; }
exit "$status"
