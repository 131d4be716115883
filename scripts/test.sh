#!/usr/bin/env bash
# The test command (README.md): installs everything the tests need, on a fresh Debian machine
# too, then runs the checks and the whole suite, slow end-to-end tests included.
#   bash scripts/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -f scripts/install_test_deps.sh ]; then
  bash scripts/install_test_deps.sh
fi
python3 -m pip install --quiet --disable-pip-version-check -e ".[test]"

echo "== generated code is up to date"
python3 -m tools.gen_proto --check
echo "== import contracts (DESIGN.md §7)"
lint-imports
echo "== tests"
python3 -m pytest -q -p no:cacheprovider "$@"
