#!/usr/bin/env bash
# The main job, end to end on this machine: sets it up, starts a throwaway
# PostgreSQL cluster with cd2sync and the local CD2 emulator with sample data
# for two Canvas instances, syncs both (snapshots), shows watermarks and row
# counts, then lets upstream change and syncs again (incrementals).
# Everything is removed at the end.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
setup_all

work=$(make_workdir)
pids=()
cleanup() {
    set +e
    as_user pg_ctl -D "$work/data" -m fast stop >/dev/null 2>&1
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    pkill -f "$work/cd2emu.py" 2>/dev/null   # runuser does not always pass the signal on
    rm -rf "$work"
}
trap cleanup EXIT

echo "== starting the CD2 emulator (sample data: instances demo-north and demo-south)"
cp "$CD2_ROOT/test/emulator/cd2emu.py" "$work/"
# started without a subshell between, so that $! is the process to stop
emu_cmd=(python3 "$work/cd2emu.py" --port 0 --port-file "$work/emu.port" --generate demo --quiet)
if [ "$(id -u)" = 0 ]; then
    runuser -u "$CD2_USER" -- "${emu_cmd[@]}" >"$work/emu.log" 2>&1 &
else
    "${emu_cmd[@]}" >"$work/emu.log" 2>&1 &
fi
pids+=($!)
for _ in $(seq 100); do [ -s "$work/emu.port" ] && break; sleep 0.1; done
emu="http://127.0.0.1:$(cat "$work/emu.port")"
echo "   $emu"

echo "== starting a throwaway PostgreSQL 15 cluster"
as_user initdb -D "$work/data" -A trust -U postgres >/dev/null
cat >>"$work/data/postgresql.conf" <<EOF
listen_addresses = ''
unix_socket_directories = '$work'
port = 5499
shared_preload_libraries = ''
cd2sync.job_rate = 0          # the local emulator has no rate limit (the real API: 5 jobs a minute)
EOF
as_user pg_ctl -D "$work/data" -l "$work/postgres.log" -w start >/dev/null
psql() { as_user env PGHOST="$work" PGPORT=5499 PGUSER=postgres /usr/lib/postgresql/15/bin/psql -X -v ON_ERROR_STOP=1 -q "$@"; }

echo "== CREATE EXTENSION cd2sync; register two instances"
psql <<SQL
CREATE EXTENSION cd2sync;
SET log_statement = 'none';   -- the next statements carry secrets
SELECT cd2_add_instance('north', 'us-east-1#demo-north', 'north-secret', api_url => '$emu', shard_id => 1);
SELECT cd2_add_instance('south', 'us-east-1#demo-south', 'south-secret', api_url => '$emu', shard_id => 2,
                        tables => ARRAY['users', 'courses', 'enrollments']);
SQL

echo "== first sync: snapshots"
psql -c "SELECT * FROM cd2_sync_now('north')" -c "SELECT * FROM cd2_sync_now('south')"

echo "== watermarks"
psql -c "SELECT instance, table_name, watermark, schema_version, status FROM cd2sync.watermarks ORDER BY 1, 2"

echo "== row counts"
psql <<'SQL'
SELECT i.name AS instance, t.table_name,
       (xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM %I.%I', i.target_schema, t.table_name),
                                            false, true, '')))[1]::text::bigint AS rows
  FROM cd2sync.instances i JOIN cd2sync.table_state t ON t.instance = i.name
 ORDER BY 1, 2;
SQL

echo "== upstream changes (an epoch in the emulator): users renamed, enrollments deleted"
python3 - "$emu" <<'PY'
import json, sys, urllib.request
emu = sys.argv[1]
def call(path, body=None):
    req = urllib.request.Request(emu + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req))
cid = "us-east-1#demo-north"
users = call("/_emu/state?client_id=" + urllib.parse.quote(cid) + "&table=users")["rows"][:3]
for u in users:
    u["value"]["name"] = u["value"]["name"] + " (renamed)"
enr = call("/_emu/state?client_id=" + urllib.parse.quote(cid) + "&table=enrollments")["rows"][:5]
print("   epoch at", call("/_emu/epoch", {"changes": [
    {"client_id": cid, "table": "users", "upsert": users},
    {"client_id": cid, "table": "enrollments", "delete": [{"key": e["key"]} for e in enr]}]})["at"])
PY

echo "== second sync of north: incrementals"
psql -c "SELECT * FROM cd2_sync_now('north')"
psql -c "SELECT id, name FROM north.users WHERE name LIKE '%(renamed)' ORDER BY id"

echo "== sync log (latest run)"
psql -c "SELECT run_id, instance, table_name, mode, rows_upserted, rows_deleted, objects, bytes_downloaded, round(seconds::numeric, 3) AS seconds
           FROM cd2sync.sync_log WHERE run_id = (SELECT max(run_id) FROM cd2sync.runs) ORDER BY table_name"
echo "== done"
