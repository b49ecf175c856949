#!/usr/bin/env bash
# The cd2sync benchmark (`make bench`). Every figure is printed with a baseline measured in
# the same run, on the same throwaway cluster, from the same data:
#   1 snapshot        cd2_sync_now vs L  = COPY of the same rows into an identical empty table
#   2 incremental     cd2_sync_now vs L2 = hand-written SQL (COPY to temp, INSERT ... ON
#                     CONFLICT DO UPDATE, DELETE ... USING), one transaction
#   3 per-row client  cd2_sync_now vs P  = psycopg2, one prepared statement per record
#   4 no-op           rows rewritten, WAL bytes and time: cd2sync vs L2 on the same records
#   5 memory          peak RSS of the sync worker during the snapshot
#   6 consortium      an analyst query over cd2.enrollments vs the raw per-instance tables;
#                     lookups by global id and by person through the view
#   7 change feeds    an incremental and a full resync with a feed following the table vs
#                     without; reading the changes
#   8 web_logs        an incremental of BENCH_LOGS new records into canvas_logs.web_logs vs
#                     COPY of the same rows into an identical partitioned table (two rounds)
# It is a benchmark, never a test: it fails only when something cannot run. Sets the machine
# up (scripts/setup.sh), starts a cluster and the emulator on loopback, and removes them.
#
#   BENCH_ROWS=1000000 BENCH_CHANGES=100000 BENCH_ENROLLMENTS=10000000 bash bench/bench.sh
#
# Other knobs: BENCH_LOGS (8's records, 5000000), BENCH_ONLY=logs (figure 8 alone), BENCH_DATA (generated data, reused; default /tmp/cd2sync-bench-data),
# BENCH_MERGES (100000), BENCH_P_CAP (200000), BENCH_VIEW_TIMEOUT (seconds, 120),
# BENCH_PROFILE=1 (pg_stat_statements: prints the statements that dominate each sync),
# BENCH_PERF=1 (as root, with perf installed: perf record -a over syncs 1, 2 and 4, summarised
# by thread, library and function into bench/profile-latest.txt),
# BENCH_KEEP=1 (leaves the cluster and the emulator running, for a look).
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$BENCH_DIR/../scripts/setup.sh"

BENCH_ROWS=${BENCH_ROWS:-1000000}
BENCH_CHANGES=${BENCH_CHANGES:-100000}
BENCH_ENROLLMENTS=${BENCH_ENROLLMENTS:-10000000}
BENCH_MERGES=${BENCH_MERGES:-100000}
BENCH_DATA=${BENCH_DATA:-/tmp/cd2sync-bench-data}
BENCH_P_CAP=${BENCH_P_CAP:-200000}
BENCH_VIEW_TIMEOUT=${BENCH_VIEW_TIMEOUT:-120}
BENCH_PROFILE=${BENCH_PROFILE:-0}
BENCH_PERF=${BENCH_PERF:-0}
BENCH_LOGS=${BENCH_LOGS:-5000000}
BENCH_ONLY=${BENCH_ONLY:-}
PROFILE_OUT=$BENCH_DIR/profile-latest.txt
RESULTS=$BENCH_DIR/results-latest.txt
[ "${BENCH_ONLY:-}" != logs ] || RESULTS=$BENCH_DIR/results-logs-latest.txt
PORT=5497
T_START=$(date +%s)

PY_DEB=/usr/bin/python3   # Debian's interpreter: python3-psycopg2 is installed for it

setup_all
if ! $PY_DEB -c 'import psycopg2' 2>/dev/null; then   # baseline P
    echo "== installing: python3-psycopg2"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-psycopg2 >/dev/null
fi

# ---- helpers ----------------------------------------------------------------------------------
now() { date +%s.%N; }
calc() { awk "BEGIN { printf \"%.${2:-3}f\", $1 }"; }       # calc EXPR [decimals]
sql() { as_user env PGHOST="$work" PGPORT=$PORT PGUSER=postgres PGDATABASE=postgres \
            /usr/lib/postgresql/15/bin/psql -X -v ON_ERROR_STOP=1 -q "$@"; }
val() { sql -At -c "$1"; }                                   # one value
# before every timed step: no step pays for another's dirty pages, nor shares the machine
# with an autovacuum that an earlier step's writes started (after figure 8's baseline COPY of
# 5M rows, autovacuum would vacuum and analyse that table while cd2sync's load is timed)
checkpoint() { quiesce; sql -c "CHECKPOINT"; }
quiesce() {   # waits (up to 10 minutes) until no autovacuum worker is at work
    local i
    for i in $(seq 1200); do
        [ "$(val "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'")" = 0 ] && return
        sleep 0.5
    done
}
lsn() { val "SELECT pg_current_wal_lsn()"; }
wal_mb() { calc "$(val "SELECT pg_wal_lsn_diff('$2', '$1')") / 1048576" 1; }
# counters of a table: n_tup_ins n_tup_upd n_tup_hot_upd n_tup_del (after the writers flushed)
tup_stats() { sleep 1.2; val "SELECT n_tup_ins || ' ' || n_tup_upd || ' ' || n_tup_hot_upd || ' ' || n_tup_del
                              FROM pg_stat_user_tables WHERE relid = '$1'::regclass"; }
# a content fingerprint (row count and a sum of row hashes): equal tables, equal fingerprints
fingerprint() { val "SELECT count(*) || ':' || coalesce(sum(hashtextextended(t::text, 0)), 0) FROM $1 t"; }
check_same() {
    if [ "$(fingerprint "$1")" = "$(fingerprint "$2")" ]; then echo "   check: $1 = $2"
    else echo "   WARNING: $1 and $2 differ"; problems+=("$1 and $2 differ after $3"); fi
}
# cd2_sync_now on the bench table; prints "mode rows_upserted rows_deleted seconds error"
sync_now() {   # [full]
    local full=false
    [ "${1:-}" = full ] && full=true
    sql -At -F ' ' -c "SELECT mode, rows_upserted, rows_deleted, round(seconds::numeric, 3), coalesce(error, '')
                         FROM cd2_sync_now('bench', tables => ARRAY['submissions'], \"full\" => $full)"
}
# the latest sync's log: unchanged rows, job_seconds and the rest (its load_seconds is logged
# before it is measured), objects and bytes
sync_split() { val "SELECT rows_unchanged || ' unchanged, ' || round(job_seconds::numeric, 2) || 's job + '
                           || round((seconds - job_seconds)::numeric, 2) || 's rest, '
                           || objects || ' objects, ' || round(bytes_downloaded / 1048576.0, 1) || ' MB downloaded'
                      FROM cd2sync.sync_log WHERE instance = 'bench' ORDER BY run_id DESC LIMIT 1"; }
# seconds the latest sync waited for its query job upstream (the emulator's job_latency)
job_s() { val "SELECT round(job_seconds::numeric, 3) FROM cd2sync.sync_log WHERE instance = 'bench'
                ORDER BY run_id DESC LIMIT 1"; }
# the CD2 columns of a table, for COPY: the files do not carry cd2sync's cd2_* bookkeeping
data_cols() { val "SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) FROM pg_attribute
                    WHERE attrelid = '$1'::regclass AND attnum > 0 AND NOT attisdropped
                      AND attname NOT LIKE 'cd2\\_%'"; }
# the hand-written incremental: COPY into temp tables, upsert, delete, one transaction
l2_apply() {   # TABLE UPSERTS_FILE DELETES_FILE
    local sets
    sets=$(val "SELECT string_agg(format('%I = excluded.%I', attname, attname), ', ' ORDER BY attnum)
                  FROM pg_attribute WHERE attrelid = '$1'::regclass AND attnum > 0 AND NOT attisdropped
                   AND attname <> 'id'")
    L2_T0=$(now)
    sql >"$work/l2.out" <<SQL
\\timing on
BEGIN;
CREATE TEMP TABLE l2_up (LIKE $1) ON COMMIT DROP;
CREATE TEMP TABLE l2_del (id bigint) ON COMMIT DROP;
COPY l2_up ($(data_cols "$1")) FROM '$2';
COPY l2_del FROM '$3';
INSERT INTO $1 AS t SELECT * FROM l2_up ON CONFLICT (id) DO UPDATE SET $sets;
DELETE FROM $1 t USING l2_del d WHERE t.id = d.id;
COMMIT;
SQL
    L2_T1=$(now)
    # where L2's time went: psql's timings of BEGIN, 2 CREATE, 2 COPY, INSERT, DELETE, COMMIT
    L2_SPLIT=$(awk '/^Time:/ {t[++n] = $2 / 1000}
                    END {printf "COPY %.2fs, upsert %.2fs, delete %.2fs, commit %.2fs", t[4] + t[5], t[6], t[7], t[8]}' \
               "$work/l2.out")
}
pclient() { $PY_DEB "$BENCH_DIR/pclient.py" --host "$work" --port $PORT "$@"; }
# samples the sync worker's memory every 100 ms while process $1 (the psql running the sync)
# lives; prints "peak RssAnon kB, last VmHWM kB, peak VmRSS kB, samples"
sample_rss() {
    local pid="" anon=0 hwm=0 rss=0 n=0 a h r
    while kill -0 "$1" 2>/dev/null; do
        [ -n "$pid" ] || pid=$(val "SELECT pid FROM pg_stat_activity WHERE backend_type = 'cd2sync sync worker' LIMIT 1" 2>/dev/null || true)
        if [ -n "$pid" ] && read -r a h r < <(awk '/^RssAnon:/ {a = $2} /^VmHWM:/ {h = $2} /^VmRSS:/ {r = $2}
                                                  END {if (h) print a + 0, h + 0, r + 0}' "/proc/$pid/status" 2>/dev/null); then
            n=$((n + 1)); [ "$a" -gt "$anon" ] && anon=$a; [ "$h" -gt "$hwm" ] && hwm=$h; [ "$r" -gt "$rss" ] && rss=$r
        fi
        sleep 0.1
    done
    echo "$anon $hwm $rss $n"
}
rows_per_s() { calc "$1 / $2" 0; }
ratio() { case "$1$2" in *timeout*|*error*) echo "-" ;; *) calc "$1 / $2" 2 ;; esac; }
ms_s() { case "$1" in timeout) echo ">${BENCH_VIEW_TIMEOUT}s" ;; error) echo error ;; *) echo "$(calc "$1 / 1000" 3)s" ;; esac; }
mb_per_s() { calc "$1 / 1048576 / $2" 1; }

# ---- data -------------------------------------------------------------------------------------
umask 022
mkdir -p "$BENCH_DATA"
echo "== data: $BENCH_ROWS rows, $BENCH_CHANGES changes (generated once, kept in $BENCH_DATA)"
data=$(python3 "$BENCH_DIR/gen.py" --root "$BENCH_DATA" --rows "$BENCH_ROWS" --changes "$BENCH_CHANGES")
chmod -R a+rX "$data"
manifest() { python3 -c "import json, sys; m = json.load(open('$data/manifest.json')); print(eval(sys.argv[1]))" "$1"; }
SNAP_RAW=$(manifest "m['snapshot']['raw_bytes']"); SNAP_GZ=$(manifest "m['snapshot']['gz_bytes']")
SNAP_PLAIN=$(manifest "m['snapshot']['plain_bytes']"); INC_RAW=$(manifest "m['inc1']['raw_bytes']")
NOOP_RAW=$(manifest "m['noop']['raw_bytes']"); NOOP_N=$(manifest "m['noop']['updates']")
INC_SUMMARY=$(manifest "'%d updates, %d inserts, %d deletes' % (m['inc1']['updates'], m['inc1']['inserts'], m['inc1']['deletes'])")
echo "   $data: snapshot $(calc "$SNAP_RAW / 1048576" 0) MB as TSV ($(calc "$SNAP_GZ / 1048576" 0) MB gzip), incremental: $INC_SUMMARY"
echo "== data: web_logs, $BENCH_LOGS new records (generated once, kept in $BENCH_DATA)"
logdata=$(python3 "$BENCH_DIR/gen_logs.py" --root "$BENCH_DATA" --rows "$BENCH_LOGS")
chmod -R a+rX "$logdata"
logm() { python3 -c "import json, sys; m = json.load(open('$logdata/manifest.json')); print(eval(sys.argv[1]))" "$1"; }
LOG_RAW=$(logm "m['inc']['raw_bytes']"); LOG_GZ=$(logm "m['inc']['gz_bytes']"); LOG_PLAIN=$(logm "m['inc']['plain_bytes']")
echo "   $logdata: $(calc "$LOG_RAW / 1048576" 0) MB as TSV ($(calc "$LOG_GZ / 1048576" 0) MB gzip)"

# ---- cluster and emulator ---------------------------------------------------------------------
work=$(make_workdir)
pids=()
problems=()
cleanup() {
    set +e
    [ -z "${PERF_PID:-}" ] || kill -INT "$PERF_PID" 2>/dev/null
    if [ "${BENCH_KEEP:-0}" = 1 ]; then   # debugging: leave the cluster and emulator running
        echo "kept: psql -h $work -p $PORT -U postgres (stop: pg_ctl -D $work/data stop; kill ${pids[*]})"
        return
    fi
    as_user pg_ctl -D "$work/data" -m fast stop >/dev/null 2>&1
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    rm -rf "$work"
}
trap cleanup EXIT

echo "== starting the emulator (bulk table submissions served from $data)"
cp "$CD2_ROOT/test/emulator/cd2emu.py" "$work/"
echo '{"instances": {"us-east-1#bench": {"secret": "bench-secret", "tables": {}}}}' >"$work/scenario.json"
# as_user with exec: $! is then runuser itself, which passes the cleanup's SIGTERM on to the
# emulator (a background as_user leaves $! on a subshell whose death the emulator outlives)
exec_as_user() { if [ "$(id -u)" = 0 ]; then exec runuser -u "$CD2_USER" -- env PATH="$PATH" "$@"; fi; exec "$@"; }
exec_as_user python3 "$work/cd2emu.py" --port 0 --port-file "$work/emu.port" --scenario "$work/scenario.json" \
    --quiet >"$work/emu.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/emu.port" ] && break; sleep 0.1; done
emu="http://127.0.0.1:$(cat "$work/emu.port")"
python3 - "$emu" "$data" <<'PY'
import json, sys, urllib.request
emu, d = sys.argv[1], sys.argv[2]
m = json.load(open(d + "/manifest.json"))
s = json.load(open(d + "/schema.json"))
body = {"client_id": "us-east-1#bench", "table": "submissions", "version": s["version"], "schema": s["schema"],
        "format": "tsv", "snapshot": {"at": m["snapshot"]["at"], "files": m["snapshot"]["files"]},
        "incrementals": [{k: m[x][k] for k in ("since", "until", "files")} for x in ("inc1", "noop")]}
req = urllib.request.Request(emu + "/_emu/bulk", data=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"})
urllib.request.urlopen(req).read()
PY
# web_logs, for bench and bench3 (synced), bench2 and bench4 (whose copies are the baseline's)
python3 - "$emu" "$logdata" <<'PY'
import json, sys, urllib.request
emu, d = sys.argv[1], sys.argv[2]
m = json.load(open(d + "/manifest.json"))
s = json.load(open(d + "/schema.json"))
for cid in ("us-east-1#bench", "us-east-1#bench2", "us-east-1#bench3", "us-east-1#bench4"):
    body = {"client_id": cid, "secret": "bench-secret", "table": "canvas_logs.web_logs", "version": s["version"],
            "schema": s["schema"], "format": "tsv", "snapshot": m["snapshot"],
            "incrementals": [{k: m["inc"][k] for k in ("since", "until", "files")}]}
    req = urllib.request.Request(emu + "/_emu/bulk", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req).read()
PY

echo "== starting a throwaway PostgreSQL 15 cluster"
as_user initdb -D "$work/data" -A trust -U postgres >/dev/null
cat >>"$work/data/postgresql.conf" <<EOF
listen_addresses = ''
unix_socket_directories = '$work'
port = $PORT
shared_buffers = 512MB
max_wal_size = 8GB
checkpoint_timeout = 30min
EOF
if [ "$BENCH_PROFILE" = 1 ]; then
    cat >>"$work/data/postgresql.conf" <<EOF
shared_preload_libraries = 'pg_stat_statements'
pg_stat_statements.track = all
pg_stat_statements.max = 2000
EOF
fi
as_user pg_ctl -D "$work/data" -l "$work/postgres.log" -w start >/dev/null
sql -o /dev/null <<SQL
CREATE EXTENSION cd2sync;
SET log_statement = 'none';
SELECT cd2_add_instance('bench', 'us-east-1#bench', 'bench-secret', api_url => '$emu',
                        tables => ARRAY['submissions', 'canvas_logs.web_logs']);
SELECT cd2_add_instance('bench' || i, 'us-east-1#bench' || i, 'bench-secret', api_url => '$emu',
                        tables => ARRAY['canvas_logs.web_logs']) FROM generate_series(2, 4) i;
SQL

if [ "$BENCH_PROFILE" = 1 ]; then sql -c "CREATE EXTENSION pg_stat_statements"; fi
profile_reset() { [ "$BENCH_PROFILE" != 1 ] || sql -o /dev/null -c "SELECT pg_stat_statements_reset()"; }
profile() {   # the statements that took the most time since profile_reset
    [ "$BENCH_PROFILE" = 1 ] || return 0
    echo "   -- pg_stat_statements (track = all), top statements of $1:"
    sql -c "SELECT round(total_exec_time::numeric / 1000, 2) AS seconds, calls, rows,
                   left(regexp_replace(query, '\s+', ' ', 'g'), 110) AS query
              FROM pg_stat_statements WHERE query !~ 'cd2_sync_now|pg_stat_statements_reset'
             ORDER BY total_exec_time DESC LIMIT 8" | sed 's/^/   /'
}

# perf over one sync: every CPU (the backend, its gunzip thread, the emulator), no call graphs
if [ "$BENCH_PERF" = 1 ]; then
    if [ "$(id -u)" != 0 ] || ! command -v perf >/dev/null; then
        echo "   (BENCH_PERF=1 needs root and perf: apt-get install linux-perf; no profile taken)"
        BENCH_PERF=0
    else
        { echo "cd2sync perf profile, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$CD2_ROOT" rev-parse --short HEAD 2>/dev/null)"
          echo "perf record -a -F 999 over each cd2_sync_now, both cores (BENCH_PERF=1 bash bench/bench.sh)"; } >"$PROFILE_OUT"
    fi
fi
perf_start() {   # recording starts disabled and is switched on just before the sync
    [ "$BENCH_PERF" = 1 ] || return 0
    rm -f "$work/perf.ctl" "$work/perf.ack"; mkfifo "$work/perf.ctl" "$work/perf.ack"
    perf record -a -F 999 -D -1 --control "fifo:$work/perf.ctl,$work/perf.ack" -o "$work/perf.data" \
        >/dev/null 2>&1 &
    PERF_PID=$!
    # opened read-write, so that neither open waits for perf; perf answers "ack" to each command
    exec 8<>"$work/perf.ctl" 9<>"$work/perf.ack"
    echo enable >&8
    if ! read -r -t 30 -u 9 _; then
        echo "   (perf did not start recording; no profile taken)"
        exec 8>&- 9<&-; kill "$PERF_PID" 2>/dev/null || true; wait "$PERF_PID" 2>/dev/null || true
        PERF_PID=; BENCH_PERF=0
    fi
}
perf_stop() {   # $1: what was profiled
    [ "$BENCH_PERF" = 1 ] || return 0
    echo disable >&8; read -r -t 30 -u 9 _ || true
    exec 8>&- 9<&-
    kill -INT "$PERF_PID" 2>/dev/null || true; wait "$PERF_PID" 2>/dev/null || true   # perf exits non-zero on SIGINT
    PERF_PID=
    { echo; echo "== $1: CPU by thread and library (samples at 999 Hz a core: ~ms of CPU; swapper = idle)"
      perf report -i "$work/perf.data" -n --no-children --sort comm,dso --stdio -q --percent-limit 1 2>/dev/null \
        | sed '/^$/d'
      echo "== $1: top functions of the sync's threads and the emulator"
      perf report -i "$work/perf.data" -n --no-children --comms "postgres,cd2sync gunzip,python3" \
          --sort comm,dso,sym --stdio -q --percent-limit 0.8 2>/dev/null | sed '/^$/d' | head -30; } >>"$PROFILE_OUT"
    rm -f "$work/perf.data" "$work/perf.ctl" "$work/perf.ack"
}

if [ "$BENCH_ONLY" != logs ]; then   # (figures 1 to 7; 8 follows)
# ---- 1. snapshot: cd2_sync_now vs L (COPY into an identical empty table) ----------------------
# (5. the sync worker's memory is sampled while this snapshot runs)
echo "== 1. snapshot of $BENCH_ROWS rows"
checkpoint; profile_reset; perf_start
w0=$(lsn); t0=$(now)
sync_now >"$work/sync1.out" &
spid=$!
read -r RSS_ANON RSS_HWM RSS_MAX RSS_N < <(sample_rss $spid)
wait $spid
t1=$(now); w1=$(lsn)
perf_stop "1 snapshot"

T_SNAP=$(calc "$t1 - $t0"); WAL_SNAP=$(wal_mb "$w0" "$w1"); J_SNAP=$(job_s)
echo "   cd2sync: $(cat "$work/sync1.out") | $(sync_split) | wall ${T_SNAP}s, WAL ${WAL_SNAP} MB"
LOADW=$(grep -o 'objects of a new table loaded by the sync worker and [0-9]* load workers' "$work/postgres.log" | tail -1 || true)
echo "   ${LOADW:-(not loaded apart)}"
read -r mode _ <"$work/sync1.out"
[ "$mode" = snapshot ] || problems+=("snapshot sync: $(cat "$work/sync1.out")")
profile "the snapshot"
echo "   table created by cd2sync:"
sql -c '\d bench.submissions' | sed 's/^/   /' | head -40

# L loads as fast as the same table can be loaded: the primary key during the COPY, the other
# indexes cd2sync's table has (lookups, built after its first load) made after it
sql -c "CREATE SCHEMA baseline" -c "CREATE TABLE baseline.base (LIKE bench.submissions INCLUDING ALL EXCLUDING INDEXES)" \
    -c "ALTER TABLE baseline.base ADD PRIMARY KEY (id)"
L_INDEXES=$(val "SELECT string_agg(replace(pg_get_indexdef(indexrelid), ' ON bench.submissions ', ' ON baseline.base '), '; ')
                   FROM pg_index WHERE indrelid = 'bench.submissions'::regclass AND NOT indisprimary")
checkpoint
w0=$(lsn); t0=$(now)
sql -c "COPY baseline.base ($(data_cols baseline.base)) FROM '$data/snapshot.copy'" ${L_INDEXES:+-c "$L_INDEXES"}
t1=$(now); w1=$(lsn)
T_L=$(calc "$t1 - $t0"); WAL_L=$(wal_mb "$w0" "$w1")
echo "   L (COPY): ${T_L}s, WAL ${WAL_L} MB"
check_same bench.submissions baseline.base "the snapshot"

# (7. replays the incremental from this state, with and without a change feed)
sql -c "CREATE TABLE baseline.pre_inc AS SELECT * FROM bench.submissions"
WM_SNAP=$(val "SELECT watermark_raw FROM cd2sync.table_state WHERE instance = 'bench' AND table_name = 'submissions'")

# ---- 2. incremental: cd2_sync_now vs L2 (hand-written set-based SQL) --------------------------
echo "== 2. incremental of $BENCH_CHANGES records ($INC_SUMMARY)"
# L2 works on a copy of the table as it is before the incremental; autovacuum would have
# vacuumed and analysed every table by now: do it for all of them
sql -c "CREATE TABLE baseline.l2 (LIKE bench.submissions INCLUDING ALL)" \
    -c "INSERT INTO baseline.l2 SELECT * FROM bench.submissions" \
    -c "VACUUM ANALYZE bench.submissions" -c "VACUUM ANALYZE baseline.base" -c "VACUUM ANALYZE baseline.l2"
checkpoint; profile_reset; perf_start
t0=$(now)
sync_now >"$work/sync2.out"
t1=$(now)
perf_stop "2 incremental"
T_INC=$(calc "$t1 - $t0"); J_INC=$(job_s)
echo "   cd2sync: $(cat "$work/sync2.out") | $(sync_split) | wall ${T_INC}s"
read -r mode _ <"$work/sync2.out"
[ "$mode" = incremental ] || problems+=("incremental sync: $(cat "$work/sync2.out")")
profile "the incremental"
checkpoint
l2_apply baseline.l2 "$data/inc1-upserts.copy" "$data/inc1-deletes.copy"
T_L2=$(calc "$L2_T1 - $L2_T0")
echo "   L2 (COPY to temp + INSERT ON CONFLICT + DELETE USING): ${T_L2}s ($L2_SPLIT)"
check_same bench.submissions baseline.l2 "the incremental"

# ---- 3. per-row client P (psycopg2, one prepared statement per record) ------------------------
echo "== 3. per-row client P"
P_CAP=$(( BENCH_ROWS < BENCH_P_CAP ? BENCH_ROWS : BENCH_P_CAP ))
sql -c "CREATE TABLE baseline.p_snap (LIKE bench.submissions INCLUDING ALL)"
checkpoint
pclient --table baseline.p_snap --upserts "$data/snapshot.copy" --limit "$P_CAP" >"$work/p1.out"
read -r tp np _ <"$work/p1.out"
T_P_SNAP=$(calc "$tp * $BENCH_ROWS / $np")
echo "   snapshot: $np rows in ${tp}s -> ${T_P_SNAP}s for $BENCH_ROWS rows (extrapolated linearly)"
# P applies the incremental to baseline.base, which holds the snapshot (as cd2sync did)
checkpoint
pclient --table baseline.base --upserts "$data/inc1-upserts.copy" --deletes "$data/inc1-deletes.copy" >"$work/p2.out"
read -r T_P_INC nu nd <"$work/p2.out"
echo "   incremental: $nu upserts + $nd deletes in ${T_P_INC}s"
check_same bench.submissions baseline.base "P's incremental"

# ---- 4. no-op incremental: rows rewritten and WAL, cd2sync vs L2 -----------------------------
echo "== 4. no-op incremental: $NOOP_N records equal to the stored rows"
checkpoint; perf_start
s0=$(tup_stats bench.submissions); profile_reset; w0=$(lsn); t0=$(now)
sync_now >"$work/sync3.out"
t1=$(now); w1=$(lsn); s1=$(tup_stats bench.submissions)
perf_stop "4 no-op incremental"
T_NOOP=$(calc "$t1 - $t0"); WAL_NOOP=$(wal_mb "$w0" "$w1"); J_NOOP=$(job_s)
read -r i0 u0 h0 d0 <<<"$s0"; read -r i1 u1 h1 d1 <<<"$s1"
NOOP_UPD=$((u1 - u0)); NOOP_HOT=$((h1 - h0)); NOOP_INS=$((i1 - i0)); NOOP_DEL=$((d1 - d0))
echo "   cd2sync: $(cat "$work/sync3.out") | $(sync_split) | wall ${T_NOOP}s, updated $NOOP_UPD (HOT $NOOP_HOT), inserted $NOOP_INS, deleted $NOOP_DEL, WAL ${WAL_NOOP} MB"
read -r mode _ <"$work/sync3.out"
case "$mode" in incremental|unchanged) ;; *) problems+=("no-op sync: $(cat "$work/sync3.out")") ;; esac
profile "the no-op incremental"
checkpoint
s0=$(tup_stats baseline.l2); w0=$(lsn)
l2_apply baseline.l2 "$data/noop-upserts.copy" "$data/noop-deletes.copy"
w1=$(lsn); s1=$(tup_stats baseline.l2)
T_L2_NOOP=$(calc "$L2_T1 - $L2_T0"); WAL_L2_NOOP=$(wal_mb "$w0" "$w1")
read -r i0 u0 h0 d0 <<<"$s0"; read -r i1 u1 h1 d1 <<<"$s1"
L2_UPD=$((u1 - u0)); L2_HOT=$((h1 - h0)); L2_INS=$((i1 - i0)); L2_DEL=$((d1 - d0))
echo "   L2: ${T_L2_NOOP}s ($L2_SPLIT), updated $L2_UPD (HOT $L2_HOT), inserted $L2_INS, deleted $L2_DEL, WAL ${WAL_L2_NOOP} MB"
check_same bench.submissions baseline.l2 "the no-op incremental"

# ---- 5. memory of the sync worker during the snapshot (sampled in step 1) -------------------
RSS_ANON_MB=$(calc "$RSS_ANON / 1024" 1); RSS_HWM_MB=$(calc "$RSS_HWM / 1024" 1)
echo "== 5. sync worker memory during the snapshot ($RSS_N samples): peak private (RssAnon) ${RSS_ANON_MB} MB," \
     "VmHWM ${RSS_HWM_MB} MB (includes the shared buffers it touched); the data was $(calc "$SNAP_RAW / 1048576" 0) MB uncompressed"

# ---- 7. change feeds: the same syncs with a feed following the table, and without -----------
# From the table as the snapshot left it (restored, watermark included): a full resync of
# unchanged data, then the incremental of step 2; then both again with a feed following
# submissions; then a reader takes the feed's changes.
restore_snapshot() {
    sql -o /dev/null -c "TRUNCATE bench.submissions" -c "INSERT INTO bench.submissions SELECT * FROM baseline.pre_inc" \
        -c "UPDATE cd2sync.table_state SET watermark_raw = '$WM_SNAP', watermark = '$WM_SNAP'
             WHERE instance = 'bench' AND table_name = 'submissions'" \
        -c "VACUUM ANALYZE bench.submissions"
}
timed_sync() {   # [full] -> sets TS (seconds) and TS_OUT (the sync's line)
    checkpoint
    local t0 t1
    t0=$(now); TS_OUT=$(sync_now "$@"); t1=$(now)
    TS=$(calc "$t1 - $t0")
}
feed_changes() { val "SELECT count(*) FROM cd2sync.changes"; }
echo "== 7. change feeds: full resync of unchanged data and incremental, without and with a feed"
restore_snapshot
timed_sync full; T_RES0A=$TS; echo "   without a feed: full resync ${TS}s ($TS_OUT)"
timed_sync; T_INC0A=$TS; echo "   without a feed: incremental ${TS}s ($TS_OUT)"
restore_snapshot
sql -o /dev/null -c "SELECT cd2_create_feed('bench', tables => ARRAY['submissions'])"
timed_sync full; T_RES1A=$TS; C_RES=$(feed_changes); echo "   with a feed: full resync ${TS}s ($TS_OUT), $C_RES changes"
timed_sync; T_INC1A=$TS; C_INC=$(( $(feed_changes) - C_RES )); echo "   with a feed: incremental ${TS}s ($TS_OUT), $C_INC changes"
[ "$C_RES" = 0 ] || problems+=("a full resync of unchanged data published $C_RES changes")
[ "$C_INC" -gt 0 ] || problems+=("the incremental published no change")
# A read's time, as psql's \timing gives it (from sending the query to its last row received,
# not psql's printing of them): the first on a new connection, then the median of three more
# on it, as a consumer polling on its open connection reads. (A new backend maps each page of
# shared memory it touches on first use: on this machine's VM that is a page fault each, 0.5
# to 0.8 s for the 20,000 buffers of these changes; huge_pages takes most of it away.)
read_times() {   # QUERY -> "FIRST MEDIAN" (seconds)
    sql -At -o /dev/null -c '\timing on' -c "$1" -c "$1" -c "$1" -c "$1" |
        awk '/^Time:/ { t[n++] = $2 / 1000 }
             END { a = t[1]; b = t[2]; c = t[3]
                   m = a > b ? (b > c ? b : (a > c ? c : a)) : (a > c ? a : (b > c ? c : b))
                   printf "%.3f %.3f", t[0], m }'
}
# (what autovacuum works on as the reads start and end: the incremental's 100k changes reach
# the insert threshold of cd2sync.changes, and a VACUUM of them beside the reads takes a core)
autovacuums() { val "SELECT coalesce(string_agg(regexp_replace(query, '^autovacuum: ', ''), ', '), 'none')
                       FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'"; }
AV_READ="$(autovacuums)"
read -r T_READ_NEW T_READ <<<"$(read_times "SELECT * FROM cd2_feed_read('bench', max_changes => $BENCH_CHANGES)")"
AV_READ="$AV_READ / $(autovacuums)"
echo "   a reader takes $BENCH_CHANGES changes (psql -At, rows to the client): ${T_READ}s on its open connection," \
     "${T_READ_NEW}s the first time on a new one (autovacuum as they started / ended: $AV_READ)"
# The floors under 7a and 7d: PostgreSQL's own cost of the bytes a feed's contract asks for.
# The same change rows in a plain table with the same key: read by the same client in the
# same order (7d's baseline), and written into an empty table like cd2sync.changes by one
# INSERT (beside what a feed adds to the incremental).
sql -o /dev/null -c "CREATE TABLE baseline.changes_copy AS SELECT * FROM cd2sync.changes ORDER BY position" \
    -c "ALTER TABLE baseline.changes_copy ADD PRIMARY KEY (position)" \
    -c "CREATE TABLE baseline.changes_sink (LIKE cd2sync.changes INCLUDING ALL)" \
    -c "VACUUM ANALYZE baseline.changes_copy"
read -r T_READ0_NEW T_READ0 <<<"$(read_times "SELECT position, table_name, op, key, instance, \"row\", changed, cause, watermark
                                                FROM baseline.changes_copy ORDER BY position LIMIT $BENCH_CHANGES")"
checkpoint
t0=$(now); sql -o /dev/null -c "INSERT INTO baseline.changes_sink SELECT * FROM baseline.changes_copy"; t1=$(now)
T_WRITE0=$(calc "$t1 - $t0")
sql -o /dev/null -c "DROP TABLE baseline.changes_copy, baseline.changes_sink"
echo "   the same rows from a plain table (psql -At): ${T_READ0}s (${T_READ0_NEW}s on a new connection); written by one INSERT into an empty table like cd2sync.changes: ${T_WRITE0}s"
# 7a and 7b again in the other order, with then without (two seconds-long syncs on this
# machine drift as much as a feed costs: the ratios of the means over both orders)
# (the dropped feed's 100k changes are deleted: vacuumed now, not by an autovacuum that the
# deletes would start during the timed sync; the table is restored before the feed follows
# it again, or the feed would take the restore's TRUNCATE and 1M inserts as 2M changes)
sql -o /dev/null -c "SELECT cd2_drop_feed('bench')" -c "VACUUM cd2sync.changes"
restore_snapshot
sql -o /dev/null -c "SELECT cd2_create_feed('bench', tables => ARRAY['submissions'])"
timed_sync full; T_RES1B=$TS; echo "   with a feed, again: full resync ${TS}s ($TS_OUT), $(feed_changes) changes"
[ "$(feed_changes)" = 0 ] || problems+=("7b's second round: a full resync of unchanged data published $(feed_changes) changes")
timed_sync; T_INC1B=$TS; echo "   with a feed, again: incremental ${TS}s ($TS_OUT)"
[ "$(feed_changes)" = "$C_INC" ] || problems+=("7a's second round: $(feed_changes) changes in cd2sync.changes, not the incremental's $C_INC")
sql -o /dev/null -c "SELECT cd2_drop_feed('bench')" -c "VACUUM cd2sync.changes"
restore_snapshot
timed_sync full; T_RES0B=$TS; echo "   without a feed, again: full resync ${TS}s ($TS_OUT)"
timed_sync; T_INC0B=$TS; echo "   without a feed, again: incremental ${TS}s ($TS_OUT)"
T_INC0=$(calc "($T_INC0A + $T_INC0B) / 2"); T_INC1=$(calc "($T_INC1A + $T_INC1B) / 2")
T_RES0=$(calc "($T_RES0A + $T_RES0B) / 2"); T_RES1=$(calc "($T_RES1A + $T_RES1B) / 2")

# ---- 6. reconciled view cost: cd2.enrollments vs the raw tables of two instances --------------
# Built with SQL (no emulator): two sharded instances, users and enrollments in their target
# schemas, BENCH_MERGES users deleted with merged_into_user_id (half across shards), plus an
# enrolment on the replacement for a quarter of the merged users' same-shard enrolments
# (cd2_merge_duplicate). The view resolves every user reference; the raw side does not.
E_HALF=$((BENCH_ENROLLMENTS / 2)); U_HALF=$(( BENCH_ENROLLMENTS / 20 > 10 ? BENCH_ENROLLMENTS / 20 : 10 ))
M_HALF=$((BENCH_MERGES / 2)); [ "$M_HALF" -gt $((U_HALF / 10)) ] && M_HALF=$((U_HALF / 10))
echo "== 6. consortium: 2 instances, $((2 * E_HALF)) enrollments, $((2 * U_HALF)) users, $((2 * M_HALF)) merges"
sql -o /dev/null <<'SQL'
SET log_statement = 'none';
SELECT cd2_add_instance('c1', 'us-east-1#c1', 'unused', api_url => 'http://127.0.0.1:9', shard_id => 1);
SELECT cd2_add_instance('c2', 'us-east-1#c2', 'unused', api_url => 'http://127.0.0.1:9', shard_id => 2);
SQL
build_instance() {   # SHARD
    local s=$1 o=$((3 - $1))
    sql <<SQL
CREATE SCHEMA c$s;
CREATE TABLE c$s.users (id bigint PRIMARY KEY, name text, workflow_state text NOT NULL,
    merged_into_user_id bigint, deleted_at timestamp, created_at timestamp NOT NULL, updated_at timestamp NOT NULL);
INSERT INTO c$s.users
SELECT g, 'User ' || g, CASE WHEN g <= $M_HALF THEN 'deleted' ELSE 'registered' END,
       CASE WHEN g > $M_HALF THEN NULL
            WHEN g % 2 = 0 THEN ${o}0000000000000 + $M_HALF + 1 + (g * 7919) % ($U_HALF - $M_HALF)
            ELSE $M_HALF + 1 + (g * 104729) % ($U_HALF - $M_HALF) END,
       CASE WHEN g <= $M_HALF THEN timestamp '2026-06-01' + g * interval '1 second' END,
       timestamp '2020-01-01' + (g % 100000) * interval '1 minute', timestamp '2026-10-01'
  FROM generate_series(1::bigint, $U_HALF) g;
CREATE TABLE c$s.enrollments (id bigint PRIMARY KEY, user_id bigint NOT NULL, course_id bigint NOT NULL,
    course_section_id bigint, role_id bigint, type text NOT NULL, workflow_state text NOT NULL,
    sis_pseudonym_id bigint, root_account_id bigint, created_at timestamp, updated_at timestamp);
INSERT INTO c$s.enrollments
SELECT g, 1 + (g * 2654435761) % $U_HALF, c, c * 2 + g % 2, 100 + t, (ARRAY['StudentEnrollment', 'TeacherEnrollment',
       'TaEnrollment', 'ObserverEnrollment', 'DesignerEnrollment'])[t + 1],
       CASE WHEN g % 100 < 85 THEN 'active' WHEN g % 100 < 95 THEN 'completed' ELSE 'deleted' END,
       CASE WHEN g % 10 < 3 THEN 50000000 + g END, 1, timestamp '2025-01-01', timestamp '2026-10-01'
  FROM generate_series(1::bigint, $E_HALF) g,
       LATERAL (SELECT 1 + (g * 48271) % greatest($E_HALF / 500, 1) AS c,
                       CASE WHEN g % 20 < 17 THEN 0 ELSE g % 20 - 16 END AS t) x;
INSERT INTO c$s.enrollments
SELECT $E_HALF + row_number() OVER (ORDER BY e.id), u.merged_into_user_id, e.course_id, e.course_section_id,
       e.role_id, e.type, 'active', NULL, 1, e.created_at, e.updated_at
  FROM c$s.enrollments e JOIN c$s.users u ON u.id = e.user_id
 WHERE u.merged_into_user_id < 10000000000000 AND e.id % 4 = 0;
INSERT INTO cd2sync.table_state (instance, table_name, status) VALUES ('c$s', 'users', 'ok'), ('c$s', 'enrollments', 'ok');
SQL
}
t0=$(now)
build_instance 1 & b1=$!
build_instance 2 & b2=$!
wait $b1; wait $b2
t1=$(now)
sql -c "VACUUM ANALYZE c1.users" -c "VACUUM ANALYZE c2.users" -c "VACUUM ANALYZE c1.enrollments" -c "VACUUM ANALYZE c2.enrollments"
t2=$(now)
sql -o /dev/null -c "SELECT cd2sync.refresh_user_merges()" -c "SELECT cd2sync.refresh_views()" \
    -c "VACUUM ANALYZE cd2sync.user_merge_map"
t3=$(now)
N_ENR=$(val "SELECT (SELECT count(*) FROM c1.enrollments) + (SELECT count(*) FROM c2.enrollments)")
N_MAP=$(val "SELECT count(*) FROM cd2.user_merges")
echo "   built in $(calc "$t1 - $t0" 1)s, vacuum analyze $(calc "$t2 - $t1" 1)s," \
     "refresh_user_merges + refresh_views $(calc "$t3 - $t2" 1)s: $N_ENR enrollments, $N_MAP user merges"
RAW="(SELECT 1 AS shard, course_id, user_id, type, workflow_state FROM c1.enrollments
      UNION ALL SELECT 2, course_id, user_id, type, workflow_state FROM c2.enrollments)"
# Q1: active students per course, each person counted once (the view's ids are global, so its
# course_id alone identifies the course; the raw side groups by the shard beside it)
Q1_VIEW="SELECT count(*), sum(students) FROM (SELECT e.course_id, count(DISTINCT e.user_id) AS students
           FROM cd2.enrollments e WHERE e.type = 'StudentEnrollment' AND e.workflow_state = 'active'
          GROUP BY e.course_id) x"
Q1_RAW="SELECT count(*), sum(students) FROM (SELECT e.shard, e.course_id, count(DISTINCT e.user_id) AS students
           FROM $RAW e WHERE e.type = 'StudentEnrollment' AND e.workflow_state = 'active'
          GROUP BY e.shard, e.course_id) x"
# Q2: active enrolments per user (groups by the resolved user)
Q2_VIEW="SELECT count(*), max(n) FROM (SELECT e.user_id, count(*) AS n FROM cd2.enrollments e
          WHERE e.workflow_state = 'active' GROUP BY e.user_id) x"
Q2_RAW="SELECT count(*), max(n) FROM (SELECT e.shard, e.user_id, count(*) AS n FROM $RAW e
          WHERE e.workflow_state = 'active' GROUP BY e.shard, e.user_id) x"
# Q3: README's analyst query, which also drops the losing duplicates of merges
Q3_VIEW="SELECT count(*), sum(students) FROM (SELECT e.course_id, count(DISTINCT e.user_id) AS students
           FROM cd2.enrollments e WHERE e.type = 'StudentEnrollment' AND e.workflow_state = 'active'
            AND NOT e.cd2_merge_duplicate GROUP BY e.course_id) x"
qtime() {   # QUERY [SETTING] -> milliseconds, or "timeout"
    local out
    if out=$(sql -c "SET statement_timeout = '${BENCH_VIEW_TIMEOUT}s'" -c "${2:-SELECT}" -c '\timing on' -c "$1" 2>&1); then
        awk '/^Time:/ {print $2}' <<<"$out" | tail -1
    else
        grep -q "statement timeout" <<<"$out" && echo timeout || { echo "$out" >&2; echo error; }
    fi
}
median3() { printf '%s\n' "$@" | sort -g | sed -n 2p; }
view_pair() {   # NAME VIEW_QUERY RAW_QUERY [SETTING] -> sets V_MS R_MS
    local v=() r=() i
    for i in 1 2 3; do r+=("$(qtime "$3" "${4:-}")"); v+=("$(qtime "$2" "${4:-}")"); done
    R_MS=$(median3 "${r[@]}"); V_MS=$(median3 "${v[@]}")
    echo "   $1: cd2.enrollments ${v[*]} ms, raw ${r[*]} ms -> medians $V_MS / $R_MS ms"
}
# serial first: the planner runs the view's UNION ALL of joins with parallel workers but the
# raw UNION ALL of scans without, so only equal parallelism measures the view's own cost
SERIAL="SET max_parallel_workers_per_gather = 0"
view_pair "Q1 students per course, serial" "$Q1_VIEW" "$Q1_RAW" "$SERIAL"; Q1_V=$V_MS; Q1_R=$R_MS
view_pair "Q2 enrolments per user, serial" "$Q2_VIEW" "$Q2_RAW" "$SERIAL"; Q2_V=$V_MS; Q2_R=$R_MS
view_pair "Q1 students per course, default planner" "$Q1_VIEW" "$Q1_RAW"; Q1P_V=$V_MS; Q1P_R=$R_MS
view_pair "Q2 enrolments per user, default planner" "$Q2_VIEW" "$Q2_RAW"; Q2P_V=$V_MS; Q2P_R=$R_MS
Q3_V=$(qtime "$Q3_VIEW" "$SERIAL")
if [ "$Q3_V" != timeout ] && [ "$Q3_V" != error ]; then
    Q3_V=$(median3 "$Q3_V" "$(qtime "$Q3_VIEW" "$SERIAL")" "$(qtime "$Q3_VIEW" "$SERIAL")")
fi
echo "   Q3 README's query (NOT cd2_merge_duplicate): $(ms_s "$Q3_V") (vs raw Q1 $(ms_s "$Q1_R"))"
# lookups: an enrolment by its global id, and every enrolment of a person who was merged (rows
# stored under the superseded ids included); warm (each run 7 times, median), psql's \timing
LOOK_ID=$(val "SELECT 20000000000000 + $E_HALF / 2")
LOOK_USER=$(val "SELECT replacement_user_id FROM cd2sync.user_merge_map GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1")
lookup_ms() {   # QUERY -> median ms of 7 runs
    local args=() i
    for i in 1 2 3 4 5 6 7; do args+=(-c "$1"); done
    sql -c '\timing on' "${args[@]}" | awk '/^Time:/ {print $2}' | sort -g | sed -n 4p
}
L_ID=$(lookup_ms "SELECT * FROM cd2.enrollments WHERE id = $LOOK_ID")
L_USER=$(lookup_ms "SELECT * FROM cd2.enrollments WHERE user_id = $LOOK_USER")
L_USER_N=$(val "SELECT count(*) || ' rows, ' || count(*) FILTER (WHERE original_user_id <> user_id) || ' under superseded ids'
                 FROM cd2.enrollments WHERE user_id = $LOOK_USER")
echo "   lookup by global id: ${L_ID} ms; every enrolment of user $LOOK_USER ($L_USER_N): ${L_USER} ms"

fi   # (figures 1 to 7)

# ---- 8. web_logs: an incremental of new records vs COPY into the same partitioned table -------
# Four tables come from a first (small) snapshot of the same data, one per instance: bench's and
# bench3's are synced, bench2's and bench4's are the baseline's, made with the same partitions
# cd2sync makes for the incremental (the days around its window). The baseline's take the rows
# by COPY from a local file; cd2sync syncs the incremental (download, gunzip, COPY into the
# partitions). Each takes a minute or more, long enough for this machine's speed to drift: two
# rounds in the order COPY, cd2sync, cd2sync, COPY, and the ratio of the sums.
echo "== 8. web_logs: an incremental of $BENCH_LOGS new records vs COPY of the same rows (two rounds)"
for i in bench bench2 bench3 bench4; do
    r=$(sql -At -F ' ' -c "SELECT mode, rows_upserted, coalesce(error, '') FROM cd2_sync_now('$i', tables => ARRAY['canvas_logs.web_logs'])")
    echo "   $i first snapshot: $r"
done
for i in bench2 bench4; do
    sql -o /dev/null -c "SELECT cd2sync._ensure_partitions('${i}_canvas_logs.web_logs',
                            ('$(logm "m['inc']['since']")'::timestamptz - interval '1 day') AT TIME ZONE 'UTC',
                            ('$(logm "m['inc']['until']")'::timestamptz + interval '1 day') AT TIME ZONE 'UTC')"
done
LOG_COLS=$(python3 -c "import json; print(', '.join('\"%s\"' % c for c in json.load(open('$logdata/manifest.json'))['columns']))")
T_LOGC=0; T_LOGS=0; J_LOGS=0; LOG_ROUNDS=()
copy_logs() {   # $1: instance; $2: 1 to profile
    checkpoint; [ "$2" != 1 ] || perf_start
    local t0 t1 t
    t0=$(now)
    sql -c "COPY ${1}_canvas_logs.web_logs ($LOG_COLS) FROM '$logdata/inc.copy'"
    t1=$(now); t=$(calc "$t1 - $t0")
    [ "$2" != 1 ] || perf_stop "8 baseline: COPY into the partitioned table"
    echo "   COPY of the same rows into $1's partitioned table: ${t}s"
    sql -c "VACUUM ANALYZE ${1}_canvas_logs.web_logs"   # (what autovacuum would start now)
    T_LOGC=$(calc "$T_LOGC + $t"); LOG_ROUNDS+=("COPY ${t}s")
}
sync_logs() {   # $1: instance; $2: 1 to profile
    checkpoint; [ "$2" != 1 ] || { profile_reset; perf_start; }
    local t0 t1 t r j
    t0=$(now)
    r=$(sql -At -F ' ' -c "SELECT mode, rows_upserted, coalesce(error, '') FROM cd2_sync_now('$1', tables => ARRAY['canvas_logs.web_logs'])")
    t1=$(now); t=$(calc "$t1 - $t0")
    [ "$2" != 1 ] || { perf_stop "8 web_logs incremental"; profile "8 web_logs incremental"; }
    j=$(val "SELECT round(job_seconds::numeric, 3) FROM cd2sync.sync_log WHERE instance = '$1'
              AND table_name = 'canvas_logs.web_logs' ORDER BY run_id DESC LIMIT 1")
    echo "   cd2sync, $1: $r | wall ${t}s (job ${j}s)"
    [ "$(echo "$r" | cut -d' ' -f1-2)" = "incremental $BENCH_LOGS" ] || problems+=("web_logs incremental of $1: $r")
    T_LOGS=$(calc "$T_LOGS + $t"); J_LOGS=$(calc "$J_LOGS + $j"); LOG_ROUNDS+=("cd2sync ${t}s")
}
copy_logs bench2 1; sync_logs bench 1
sync_logs bench3 0; copy_logs bench4 0
T_LOGC=$(calc "$T_LOGC / 2"); T_LOGS=$(calc "$T_LOGS / 2"); J_LOGS=$(calc "$J_LOGS / 2")
STAGED_LOGS=$(grep -c 'canvas_logs.web_logs: loading through the' "$work/postgres.log" || true)
echo "   loads through staging: $STAGED_LOGS"
N_LOGS=$(val "SELECT string_agg(DISTINCT n::text, ', ') FROM (SELECT count(*) FROM bench_canvas_logs.web_logs UNION ALL
                SELECT count(*) FROM bench2_canvas_logs.web_logs UNION ALL SELECT count(*) FROM bench3_canvas_logs.web_logs
                UNION ALL SELECT count(*) FROM bench4_canvas_logs.web_logs) x(n)")
[[ "$N_LOGS" != *,* ]] && echo "   check: the four tables hold $N_LOGS rows each" || problems+=("web_logs: the tables hold $N_LOGS rows")

# ---- results --------------------------------------------------------------------------------
R() { printf '%-44s | %12s | %12s | %7s | %-12s | %9s | %7s\n' "$@"; }
{
    echo "cd2sync benchmark, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$CD2_ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$CD2_ROOT" diff --quiet HEAD 2>/dev/null || echo '+changes')"
    echo "$(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GB, $(/usr/lib/postgresql/15/bin/postgres --version)," \
         "shared_buffers 512MB, max_wal_size 8GB, checkpoint_timeout 30min, CHECKPOINT before each timed step"
    echo "BENCH_ROWS=$BENCH_ROWS BENCH_CHANGES=$BENCH_CHANGES BENCH_ENROLLMENTS=$BENCH_ENROLLMENTS BENCH_MERGES=$BENCH_MERGES;" \
         "snapshot $(calc "$SNAP_RAW / 1048576" 0) MB TSV ($(calc "$SNAP_GZ / 1048576" 0) MB gzip, $(manifest "len(m['snapshot']['files'])") parts)"
    echo "ratio = cd2sync / baseline (time: below 1 is faster than the baseline); rows/s and MB/s are cd2sync's (uncompressed TSV)"
    echo
    R "figure" "cd2sync" "baseline" "ratio" "target" "rows/s" "MB/s"
    R "--------------------------------------------" "------------" "------------" "-------" "------------" "---------" "-------"
    if [ "$BENCH_ONLY" != logs ]; then
    R "1 snapshot, vs L = COPY into same table" "${T_SNAP}s" "${T_L}s" "$(ratio "$T_SNAP" "$T_L")" "<= 1.0" \
      "$(rows_per_s "$BENCH_ROWS" "$T_SNAP")" "$(mb_per_s "$SNAP_RAW" "$T_SNAP")"
    R "  the same, job wait excluded (***)" "$(calc "$T_SNAP - $J_SNAP")s" "${T_L}s" "$(ratio "$(calc "$T_SNAP - $J_SNAP")" "$T_L")" "" "" ""
    R "  L itself" "" "" "" "" "$(rows_per_s "$BENCH_ROWS" "$T_L")" "$(mb_per_s "$SNAP_PLAIN" "$T_L")"
    R "2 incremental, vs L2 = hand-written SQL" "${T_INC}s" "${T_L2}s" "$(ratio "$T_INC" "$T_L2")" "<= 1.3" \
      "$(rows_per_s "$BENCH_CHANGES" "$T_INC")" "$(mb_per_s "$INC_RAW" "$T_INC")"
    R "  the same, job wait excluded (***)" "$(calc "$T_INC - $J_INC")s" "${T_L2}s" "$(ratio "$(calc "$T_INC - $J_INC")" "$T_L2")" "" "" ""
    R "3a snapshot, vs P = per-row psycopg2 (*)" "${T_SNAP}s" "${T_P_SNAP}s" "$(ratio "$T_SNAP" "$T_P_SNAP")" "< 1" \
      "$(rows_per_s "$BENCH_ROWS" "$T_SNAP")" "$(mb_per_s "$SNAP_RAW" "$T_SNAP")"
    R "3b incremental, vs P" "${T_INC}s" "${T_P_INC}s" "$(ratio "$T_INC" "$T_P_INC")" "< 1" \
      "$(rows_per_s "$BENCH_CHANGES" "$T_INC")" "$(mb_per_s "$INC_RAW" "$T_INC")"
    R "4a no-op incremental: time, vs L2" "${T_NOOP}s" "${T_L2_NOOP}s" "$(ratio "$T_NOOP" "$T_L2_NOOP")" "< 0.33" \
      "$(rows_per_s "$NOOP_N" "$T_NOOP")" "$(mb_per_s "$NOOP_RAW" "$T_NOOP")"
    R "  the same, job wait excluded (***)" "$(calc "$T_NOOP - $J_NOOP")s" "${T_L2_NOOP}s" "$(ratio "$(calc "$T_NOOP - $J_NOOP")" "$T_L2_NOOP")" "" "" ""
    R "4b no-op: rows rewritten (upd/ins/del)" "$NOOP_UPD/$NOOP_INS/$NOOP_DEL" "$L2_UPD/$L2_INS/$L2_DEL" "-" "0" "" ""
    R "4c no-op: WAL written" "${WAL_NOOP} MB" "${WAL_L2_NOOP} MB" "$(ratio "$WAL_NOOP" "$WAL_L2_NOOP")" "< 1" "" ""
    R "5 sync worker peak RSS, snapshot (**)" "${RSS_ANON_MB} MB" "-" "-" "<= 64 MB" "" ""
    R "6 Q1 students/course: cd2 view vs raw" "$(ms_s "$Q1_V")" "$(ms_s "$Q1_R")" "$(ratio "$Q1_V" "$Q1_R")" "<= 1.2" \
      "$(rows_per_s "$N_ENR" "$(calc "$Q1_V / 1000")")" ""
    R "6b Q2 enrolments/user: cd2 view vs raw" "$(ms_s "$Q2_V")" "$(ms_s "$Q2_R")" "$(ratio "$Q2_V" "$Q2_R")" "<= 1.2" \
      "$(rows_per_s "$N_ENR" "$(calc "$Q2_V / 1000")")" ""
    R "6c Q1 + NOT cd2_merge_duplicate vs raw Q1" "$(ms_s "$Q3_V")" "$(ms_s "$Q1_R")" "$(ratio "$Q3_V" "$Q1_R")" "<= 1.2" "" ""
    R "6d Q1, default planner (parallel)" "$(ms_s "$Q1P_V")" "$(ms_s "$Q1P_R")" "$(ratio "$Q1P_V" "$Q1P_R")" "<= 1.2" \
      "$(rows_per_s "$N_ENR" "$(calc "$Q1P_V / 1000")")" ""
    R "6e Q2, default planner (parallel)" "$(ms_s "$Q2P_V")" "$(ms_s "$Q2P_R")" "$(ratio "$Q2P_V" "$Q2P_R")" "<= 1.2" \
      "$(rows_per_s "$N_ENR" "$(calc "$Q2P_V / 1000")")" ""
    R "6f lookup by global id, cd2 view" "${L_ID} ms" "-" "-" "< 5 ms" "" ""
    R "6g every enrolment of a person, cd2 view" "${L_USER} ms" "-" "-" "< 5 ms" "" ""
    R "7a incremental with a feed vs without" "${T_INC1}s" "${T_INC0}s" "$(ratio "$T_INC1" "$T_INC0")" "<= 1.3" \
      "$(rows_per_s "$BENCH_CHANGES" "$T_INC1")" ""
    R "  time a feed adds, vs INSERT of its rows" "$(calc "$T_INC1 - $T_INC0")s" "${T_WRITE0}s" \
      "$(ratio "$(calc "$T_INC1 - $T_INC0")" "$T_WRITE0")" "" "" ""
    R "7b full resync, unchanged, feed vs without" "${T_RES1}s" "${T_RES0}s" "$(ratio "$T_RES1" "$T_RES0")" "<= 1.3" "" ""
    R "7c   changes it published" "$C_RES" "-" "-" "0" "" ""
    R "7d reading $C_INC changes, vs plain table" "${T_READ}s" "${T_READ0}s" "$(ratio "$T_READ" "$T_READ0")" "< 1 s" \
      "$(rows_per_s "$C_INC" "$T_READ")" ""
    R "  the first read on a new connection" "${T_READ_NEW}s" "${T_READ0_NEW}s" "$(ratio "$T_READ_NEW" "$T_READ0_NEW")" "" "" ""
    fi
    R "8 web_logs +$BENCH_LOGS, vs COPY same rows" "${T_LOGS}s" "${T_LOGC}s" "$(ratio "$T_LOGS" "$T_LOGC")" "<= 1.1" \
      "$(rows_per_s "$BENCH_LOGS" "$T_LOGS")" "$(mb_per_s "$LOG_RAW" "$T_LOGS")"
    R "  the same, job wait excluded (***)" "$(calc "$T_LOGS - $J_LOGS")s" "${T_LOGC}s" "$(ratio "$(calc "$T_LOGS - $J_LOGS")" "$T_LOGC")" "" "" ""
    echo
    if [ "$BENCH_ONLY" != logs ]; then
    echo "(*) P ran $np of $BENCH_ROWS snapshot rows (${tp}s) and is extrapolated linearly; its incremental ran in full."
    echo "1: the new table's objects were loaded apart, ${LOADW:-not by load workers} (cd2sync.load_workers = -1: the cores less one)."
    echo "(**) private memory (RssAnon) of the 'cd2sync sync worker' backend, sampled every 100 ms (a load worker is a process of its own); its VmHWM," \
         "which counts the shared buffers it touched, was ${RSS_HWM_MB} MB. Snapshot: $(calc "$SNAP_RAW / 1048576" 0) MB uncompressed."
    echo "(***) wall time less the time the sync waited for its query job upstream (the emulator's job_latency, 0.3 s;" \
         "${J_SNAP}s, ${J_INC}s and ${J_NOOP}s here): download, decompression, decoding and apply against the baseline's work."
    echo "WAL: snapshot cd2sync ${WAL_SNAP} MB vs L ${WAL_L} MB. No-op HOT updates: cd2sync $NOOP_HOT, L2 $L2_HOT."
    echo "6f/6g: median of 7 warm runs (psql \\timing, client round trip included); the person: $L_USER_N."
    echo "7: syncs of the bench table restored to its snapshot; 7a/7b with and without a feed following it; 7a and 7b: the means of two rounds, without then with (7a ${T_INC0A}s, ${T_INC1A}s; 7b ${T_RES0A}s, ${T_RES1A}s), with then without (7a ${T_INC1B}s, ${T_INC0B}s; 7b ${T_RES1B}s, ${T_RES0B}s)."
    echo "7a's floor: the time a feed adds to the incremental (7a with less without) beside one INSERT of the same $C_INC change rows" \
         "(${T_WRITE0}s) into an empty table like cd2sync.changes; 7d's baseline: the same rows and columns from a plain table with" \
         "the same key, read by the same client (psql -At) in the same order: PostgreSQL's and psql's own cost of these bytes." \
         "7d: psql's \\timing (the query sent to its last row received), the median of three reads on a connection that has read" \
         "before (a consumer's, polling); its first read, on a new connection, also maps the shared buffers it touches (page faults)." \
         "Autovacuum as 7d's reads started / ended: $AV_READ."
    echo "6: $N_ENR enrollments, $N_MAP merges, 3 runs each, median; raw = UNION ALL of c1/c2.enrollments grouped by (shard, ...);" \
         "6-6c with max_parallel_workers_per_gather = 0 (the planner parallelises the view but not the raw union);" \
         "6c runs until BENCH_VIEW_TIMEOUT=${BENCH_VIEW_TIMEOUT}s."
    fi
    echo "8: $BENCH_LOGS web_logs records, $(calc "$LOG_RAW / 1048576" 0) MB TSV ($(calc "$LOG_GZ / 1048576" 0) MB gzip);" \
         "the four tables partitioned by day with the same indexes (key, BRIN on the request time, users' lookups);" \
         "loads through staging (a fallback): $STAGED_LOGS;" \
         "times are the means of two rounds, in this order: $(IFS=,; echo "${LOG_ROUNDS[*]}" | sed 's/,/, /g')."
    if [ ${#problems[@]} -gt 0 ]; then printf 'PROBLEM: %s\n' "${problems[@]}"; fi
    echo "total bench time $(( $(date +%s) - T_START ))s"
} | tee "$RESULTS.tmp"
mv "$RESULTS.tmp" "$RESULTS"
echo "(written to $RESULTS)"
[ "$BENCH_PERF" != 1 ] || echo "(perf profile written to $PROFILE_OUT)"
