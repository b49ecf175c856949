#!/usr/bin/env bash
# Runs cd2sync's pg_regress and TAP tests once against an AddressSanitizer +
# UndefinedBehaviorSanitizer build of the extension, then fails if a test
# failed or a server log holds a sanitizer report. Not part of CI (~3 minutes).
#
#   bash scripts/sanitize.sh          as root (tests run as $CD2_USER) or as a user
#   KEEP=1 bash scripts/sanitize.sh   keep the scratch directory even on success
#
# Nothing installed system-wide is touched: PostgreSQL 15 is copied to a
# private root in a scratch directory (it is relocatable: pg_config and the
# server find lib/ and share/ relative to their own binaries), the extension is
# built in a copy of the tree with the sanitizers and installed there, and the
# tests run with that root's bin/ first in PATH.
#
# The server itself is not instrumented: only cd2sync.so is. The ASan runtime
# must be the first library of the process, so bin/postgres becomes a wrapper
# that LD_PRELOADs it and execs the real binary. A second, tiny preloaded
# object linked with -z initfirst initializes ASan before any other library's
# constructor: otherwise the runtime initializes lazily inside libp11-kit's
# constructor (pulled in by libldap -> libgnutls), within newlocale() with
# glibc's locale lock held; that leaves the lock with a negative reader count
# and the server hangs in its first setlocale/bindtextdomain (postgres -V never
# returns; the likely cause of the earlier LD_PRELOAD attempt hanging).
# Leak detection is off: backends fork without exec and memory contexts are
# freed wholesale by design.
#
# Limits: palloc'd memory lives inside malloc'd blocks of memory contexts, so
# ASan sees overflows off the end of a block, of malloc'd buffers (http.c,
# libcurl, zlib), of stack and global arrays, and use of freed malloc memory,
# but not an overflow from one palloc chunk into its neighbour.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
ensure_packages
ensure_user
# (not build_install: this script installs nothing outside its scratch directory)

SECONDS=0
PGVER=15
SAN_FLAGS="-fsanitize=address,undefined,float-cast-overflow -fno-sanitize=alignment -fno-omit-frame-pointer -g -O1"
LIBASAN=$(readlink -f "$(gcc -print-file-name=libasan.so)")
[ -f "$LIBASAN" ] || { echo "no ASan runtime for gcc (libasan)" >&2; exit 1; }

work=$(make_workdir)
status=0
cleanup() {
    local rc=$?
    if [ -f "$work/preflight/postmaster.pid" ]; then
        as_user pg_ctl -D "$work/preflight" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    if [ "$rc" = 0 ] && [ -z "${KEEP:-}" ]; then rm -rf "$work"; else echo "== scratch directory kept: $work"; fi
}
trap cleanup EXIT
cd "$work"    # the test user can read it

root=$work/root
echo "== private PostgreSQL $PGVER in $root"
bindir=$(private_pg_root "$root")
pgc=$bindir/pg_config
pkglibdir=$($pgc --pkglibdir)
sharedir=$($pgc --sharedir)

# Suppressions: only for reports inside PostgreSQL or system libraries that are
# known false positives, each with its reason. Never for cd2sync (checked here).
cat > "$work/asan.supp" <<'SUPP'
# (none needed so far)
SUPP
cat > "$work/ubsan.supp" <<'SUPP'
# (none needed so far)
SUPP
if grep -hv '^#' "$work/asan.supp" "$work/ubsan.supp" | grep -qiE 'cd2sync|src/'; then
    echo "a suppression names cd2sync: not allowed" >&2
    exit 1
fi

# Preloaded after the ASan runtime: runs before every other constructor
# (DF_1_INITFIRST) and initializes ASan. It also carries UBSan's options:
# libubsan initializes only when cd2sync.so is loaded, after the server has
# overwritten its environment area with the ps display, so it would not see
# UBSAN_OPTIONS (nor, for that matter, a log_path: reports go to stderr, i.e.
# to the server logs the tests keep).
cat > "$work/asan_initfirst.c" <<'SHIM'
extern void __asan_init(void);
const char *__ubsan_default_options(void);
__attribute__((constructor)) static void asan_initfirst(void) { __asan_init(); }
const char *__ubsan_default_options(void) { return UBSAN_DEFAULTS; }
SHIM
gcc -shared -fPIC -O1 -Wl,-z,initfirst -o "$pkglibdir/asan_initfirst.so" "$work/asan_initfirst.c" "$LIBASAN" \
    -DUBSAN_DEFAULTS="\"print_stacktrace=1:halt_on_error=0:suppressions=$work/ubsan.supp\""

mv "$bindir/postgres" "$bindir/postgres.real"
cat > "$bindir/postgres" <<WRAPPER
#!/bin/sh
# sanitize.sh: the server with the ASan runtime loaded first
export LD_PRELOAD="$LIBASAN $pkglibdir/asan_initfirst.so"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:disable_coredump=1:quarantine_size_mb=64:suppressions=$work/asan.supp"
exec "$bindir/postgres.real" "\$@"
WRAPPER
chmod 755 "$bindir/postgres"
timeout 30 "$bindir/postgres" -V >/dev/null || { echo "the wrapped server does not start" >&2; exit 1; }

echo "== building cd2sync with $SAN_FLAGS"
cp -a "$CD2_ROOT/." "$work/src"
rm -rf "$work/src/.git" "$work/src/tmp_check" "$work/src/tmp_regress"
make -C "$work/src" -s PG_CONFIG="$pgc" clean
# COPT is PGXS's hook for extra compiler and linker flags (the Makefile stays as is)
nice -n 10 make -C "$work/src" -s PG_CONFIG="$pgc" COPT="$SAN_FLAGS"
make -C "$work/src" -s PG_CONFIG="$pgc" install >/dev/null
ldd "$pkglibdir/cd2sync.so" | grep -q libasan || { echo "cd2sync.so is not instrumented" >&2; exit 1; }
[ "$(id -u)" = 0 ] && chown -R "$CD2_USER" "$work"

export PATH="$bindir:$PATH"
export PG_TEST_TIMEOUT_DEFAULT=${PG_TEST_TIMEOUT_DEFAULT:-360}   # the instrumented server is slower

echo "== preflight: ASan is in the server and cd2sync.so loads"
pre=$work/preflight
as_user initdb -D "$pre" -A trust -U postgres >/dev/null
as_user pg_ctl -D "$pre" -l "$pre.log" -o "-c listen_addresses='' -c unix_socket_directories='$work'" -w -t 120 start >/dev/null
maps=$(as_user psql -h "$work" -U postgres -d postgres -Atq -c "LOAD 'cd2sync'" \
       -c "SELECT pg_read_file('/proc/self/maps')" || true)
as_user pg_ctl -D "$pre" -m fast -w stop >/dev/null
if ! grep -q libasan <<<"$maps" || ! grep -q "$pkglibdir/cd2sync.so" <<<"$maps"; then
    echo "preflight failed: the backend has not loaded libasan and our cd2sync.so" >&2
    cat "$pre.log" >&2
    exit 1
fi
rm -rf "$pre" "$pre.log"

out=$work/tests.log
echo "== pg_regress (log: $out)"
(cd "$work/src" && as_user nice -n 10 make -s installcheck PG_CONFIG="$pgc" TAP_TESTS=) 2>&1 | tee "$out" || status=1
if [ -f "$work/src/regression.diffs" ]; then cat "$work/src/regression.diffs"; fi
echo "== TAP tests"
(cd "$work/src" && as_user nice -n 10 make -s installcheck PG_CONFIG="$pgc" REGRESS= PROVE_FLAGS="--timer") 2>&1 | tee -a "$out" || status=1

echo "== sanitizer reports"
# in the servers' logs (stderr): TAP's tmp_check/log, pg_regress's test/log
start='ERROR: AddressSanitizer|ERROR: LeakSanitizer|AddressSanitizer:DEADLYSIGNAL|runtime error:'
reports=$(grep -rlE "$start" "$work/src/tmp_check/log" "$work/src/test/log" 2>/dev/null || true)
if [ -n "$reports" ]; then
    status=1
    while read -r f; do
        echo "---- $f: $(grep -cE "$start" "$f") report(s)"
        grep -E -A45 "$start" "$f" | head -n 300
    done <<<"$reports"
else
    echo "none"
fi

if [ "$status" != 0 ] && [ -d "$work/src/tmp_check/log" ]; then
    grep -lE "TRAP|terminated by signal|PANIC" "$work"/src/tmp_check/log/*.log 2>/dev/null | sed 's/^/server log with a crash: /' || true
fi
echo "== sanitize.sh: $([ "$status" = 0 ] && echo PASS || echo FAIL) in $((SECONDS / 60))m$((SECONDS % 60))s"
exit $status
