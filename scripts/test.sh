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

# cd2sync 1.0 as released, in a private PostgreSQL root: t/012_upgrade.pl
# syncs with it, then updates to this build (needs the git history)
echo "== building cd2sync 1.0 (git $CD2_RELEASE_1_0) for the upgrade test"
if git -C "$CD2_ROOT" cat-file -e "$CD2_RELEASE_1_0^{commit}" 2>/dev/null \
        && CD2_OLD_BINDIR=$(release_root "$CD2_RELEASE_1_0" "$work/v1.0"); then
    export CD2_OLD_BINDIR
    [ "$(id -u)" = 0 ] && chown -R "$CD2_USER" "$work/v1.0"
else
    echo "   not available (no git history here): t/012_upgrade.pl skips its 1.0 sync"
fi

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
