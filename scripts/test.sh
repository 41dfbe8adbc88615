#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint (ruff, mypy), then run pytest with the given arguments.
#
# Exit status: pytest's when it fails (5, "no tests collected", counts as a failure),
# otherwise the first failing linter's. SKIP_LINT=1 skips ruff and mypy (quick local runs).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh || exit $?
VENV=$PWD/.venv
export PATH=$VENV/bin:$PATH

lint_rc=0
if [ "${SKIP_LINT:-0}" != 1 ]; then
    targets=()
    for d in fetchd tests bench client bitbake-client/lib; do
        [ -e "$d" ] && targets+=("$d")
    done
    echo "== ruff check ${targets[*]}"
    ruff check "${targets[@]}" || lint_rc=$?
    echo "== mypy"
    mypy || { rc=$?; [ "$lint_rc" -ne 0 ] || lint_rc=$rc; }
fi

echo "== pytest -q $*"
python -m pytest -q "$@"
test_rc=$?
if [ "$test_rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests: failing" >&2
fi
if [ "$test_rc" -ne 0 ]; then
    exit "$test_rc"
fi
if [ "$lint_rc" -ne 0 ]; then
    echo "test.sh: tests passed but lint failed (exit $lint_rc)" >&2
fi
exit "$lint_rc"
