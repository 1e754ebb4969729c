#!/usr/bin/env bash
# The tests that read ../shared, run once more in a copy of this checkout with no ../shared beside it: what a
# user's fresh clone sees. There they skip with their reason or fall back to generated data, and must pass.
# `make test` runs this after the suite whenever ../shared exists (without it, the suite itself was that run).
set -euo pipefail
cd "$(dirname "$0")/.."
here=$PWD
tmp=$(mktemp -d "${TMPDIR:-/tmp}/attrdist-noshared.XXXXXX")
trap 'rm -rf "$tmp"' EXIT  # only the copy this script made
mkdir "$tmp/attrdist"
git ls-files -co --exclude-standard -z | tar --null -cf - -T - | tar -xf - -C "$tmp/attrdist"
test ! -e "$tmp/shared"
cd "$tmp/attrdist"
tests=$(grep -l "SHARED_DATA" tests/test_*.py)
echo "without ../shared (a copy in $tmp): $(echo $tests | wc -w) test files that read it"
"$here/.venv/bin/pytest" -q -p no:cacheprovider -m "not slow" $tests tests/test_layout.py
