#!/usr/bin/env bash
# Set up and run the whole test suite (unit, decoding, SQLite + PostgreSQL, daemon subprocesses).
# The tests run in three pytest processes at once (pytest-xdist), on the two cores CI has: most
# of them wait on daemons, servers and disks. One process left a core idle about half the time;
# two kept the cores 65% busy over the daemon tests, and the whole run took 1,700 s; three, 93%
# busy, 1,044 s. The tests marked `alone` run afterwards, by themselves. Arguments go to both runs: scripts/test.sh -q tests/db
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-packages.sh
bash scripts/setup.sh test

# pytest exits 5 when it selects no test: a selection may leave one of the two runs empty, not both
empty=0
run() {
  local status=0
  .venv/bin/python -m pytest "$@" || status=$?
  if [ "$status" -eq 5 ]; then empty=$((empty + 1)); status=0; fi
  return "$status"
}
failed=0
# --durations: the slowest tests named at the end, to keep the whole suite under 20 minutes
run -n 3 --dist loadgroup -m "not alone" --durations=25 "$@" || failed=$?
# without a path among the arguments, the second run collects only the files that hold `alone` tests
# (collecting the whole suite again took 20 s of it)
alone_files=()
if ! printf '%s\n' "$@" | grep -qv -e '^-' -e '^$'; then
  mapfile -t alone_files < <(grep -rl --include='test_*.py' 'pytest.mark.alone' tests)
fi
run -m alone --durations=5 "$@" "${alone_files[@]}" || { status=$?; [ "$failed" -ne 0 ] || failed=$status; }
[ "$empty" -lt 2 ] || failed=5
exit "$failed"
