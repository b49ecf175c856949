#!/usr/bin/env bash
# Runs every test of cd2sync on this machine, setting it up first:
# the emulator's self-test, pg_regress (SQL surface) and the TAP tests
# (worker, faults, emulator end to end). Prints a summary line at the end.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
setup_all

work=$(make_workdir)
trap 'rm -rf "$work"' EXIT
# tests write beside the sources: run them in a copy the test user owns
cp -a "$CD2_ROOT/." "$work/src"
rm -rf "$work/src/.git"
[ "$(id -u)" = 0 ] && chown -R "$CD2_USER" "$work/src"

status=0
echo "== emulator self-test"
(cd "$work/src/test/emulator" && as_user python3 -m unittest -q test_cd2emu) || status=1

echo "== pg_regress and TAP tests"
if ! (cd "$work/src" && as_user make -s installcheck PROVE_FLAGS="--timer"); then
    status=1
    for f in "$work"/src/regression.diffs; do [ -f "$f" ] && cat "$f"; done
    for f in "$work"/src/tmp_check/log/*; do
        [ -f "$f" ] && { echo "---- $f"; tail -n 60 "$f"; }
    done
fi
exit $status
