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
# secrets come from files, never in a statement's text (docs/security.md)
(umask 077; echo north-secret > "$work/north.secret"; echo south-secret > "$work/south.secret")
[ "$(id -u)" = 0 ] && chown "$CD2_USER" "$work/north.secret" "$work/south.secret"
psql <<SQL
CREATE EXTENSION cd2sync;
BEGIN;
CREATE TEMP TABLE cd2_secret (instance text, v text) ON COMMIT DROP;
\\copy cd2_secret (v) FROM '$work/north.secret'
UPDATE cd2_secret SET instance = 'north';
\\copy cd2_secret (v) FROM '$work/south.secret'
UPDATE cd2_secret SET instance = 'south' WHERE instance IS NULL;
SELECT cd2_add_instance('north', 'us-east-1#demo-north', (SELECT v FROM cd2_secret WHERE instance = 'north'),
                        api_url => '$emu', shard_id => 1);
-- south: three canvas tables and one table of each other namespace
SELECT cd2_add_instance('south', 'us-east-1#demo-south', (SELECT v FROM cd2_secret WHERE instance = 'south'),
                        api_url => '$emu', shard_id => 2,
                        tables => ARRAY['users', 'courses', 'enrollments', 'canvas_logs.web_logs',
                                        'new_quizzes.quiz_sessions', 'catalog.products']);
COMMIT;
SQL

echo "== first sync: snapshots"
psql -c "SELECT * FROM cd2_sync_now('north')" -c "SELECT * FROM cd2_sync_now('south')"

echo "== watermarks"
psql -c "SELECT instance, table_name, watermark, schema_version, status FROM cd2sync.watermarks ORDER BY 1, 2"

echo "== row counts"
psql <<'SQL'
SELECT i.name AS instance, t.table_name, r.rel AS stored_in,
       (xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM %s', r.rel),
                                            false, true, '')))[1]::text::bigint AS rows
  FROM cd2sync.instances i JOIN cd2sync.table_state t ON t.instance = i.name
 CROSS JOIN LATERAL (SELECT cd2sync._instance_rel(i.target_schema, t.table_name) AS rel) r
 ORDER BY 1, 2;
SQL

echo "== the other namespaces: reconciled views in cd2_<namespace>, users resolved as in cd2"
psql <<'SQL'
SELECT instance, "timestamp", user_id, original_user_id, http_method, url
  FROM cd2_canvas_logs.web_logs WHERE user_id IS NOT NULL ORDER BY "timestamp" DESC LIMIT 3;
SELECT instance, id, quiz_id, user_id, score, status FROM cd2_new_quizzes.quiz_sessions ORDER BY id LIMIT 3;
SELECT instance, id, title, type, price FROM cd2_catalog.products ORDER BY id LIMIT 3;
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

echo "== a change feed for the SIS: it follows cd2.enrollments from now on"
psql -c "SELECT cd2_create_feed('sis', tables => ARRAY['enrollments'])"

echo "== a user merge across instances, arriving out of order"
echo "   Canvas merges a north user into a south user. CD2 gives the evidence (the old user"
echo "   deleted, merged_into_user_id set) in north's users table first; north's enrolments"
echo "   still name the old user until a later export."
python3 - "$emu" "$work/merge-later.json" >"$work/merge.env" <<'PY'
import json, sys, urllib.request, urllib.parse
emu = sys.argv[1]
def call(path, body=None):
    req = urllib.request.Request(emu + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req))
def state(cid, table):
    return call("/_emu/state?client_id=" + urllib.parse.quote(cid) + "&table=" + table)["rows"]
north, south = "us-east-1#demo-north", "us-east-1#demo-south"
G, shard = 10**13, {north: 1, south: 2}
gid = lambda cid, i: i if i >= G else shard[cid] * G + i
users = {u["key"]["id"]: u for u in state(north, "users")}
enr = state(north, "enrollments")
# a registered north user with enrolments, and a registered south user
old = next(uid for uid in sorted(users) if users[uid]["value"].get("workflow_state") == "registered"
           and sum(1 for e in enr if e["value"].get("user_id") == uid) >= 2)
new = next(u for u in state(south, "users") if u["value"].get("workflow_state") == "registered")
u = users[old]
u["value"].update(workflow_state="deleted", merged_into_user_id=gid(south, new["key"]["id"]))
call("/_emu/epoch", {"changes": [{"client_id": north, "table": "users", "upsert": [u]}]})
moved = [e for e in enr if e["value"].get("user_id") == old]
for e in moved:
    e["value"]["user_id"] = gid(south, new["key"]["id"])
print("OLD=%d NEW=%d" % (gid(north, old), gid(south, new["key"]["id"])))
with open(sys.argv[2], "w") as f:   # the enrolments' own move, for the next epoch
    json.dump({"changes": [{"client_id": north, "table": "enrollments", "upsert": moved}]}, f)
PY
. "$work/merge.env"
echo "   old user $OLD (north) -> new user $NEW (south)"
psql -c "SELECT table_name, mode, rows_upserted FROM cd2_sync_now('north', tables => ARRAY['users'])"
echo "-- the resolver maps the old user, the view shows the new one at once:"
psql -c "SELECT * FROM cd2.user_merges WHERE superseded_user_id = $OLD"
psql -c "SELECT instance, id, user_id, original_user_id, workflow_state FROM cd2.enrollments WHERE user_id = $NEW ORDER BY id"
echo "-- the feed: one update per enrolment, cause merge, user_id changed, nothing deleted:"
psql -c "SELECT position, op, key, changed, cause FROM cd2_feed_read('sis') ORDER BY position"

echo "== later, north's enrolments catch up: they name the new user upstream too"
python3 - "$emu" "$work/merge-later.json" <<'PY'
import json, sys, urllib.request
req = urllib.request.Request(sys.argv[1] + "/_emu/epoch", data=open(sys.argv[2], "rb").read(),
                             headers={"Content-Type": "application/json"})
urllib.request.urlopen(req).read()
PY
psql -c "SELECT table_name, mode, rows_upserted FROM cd2_sync_now('north', tables => ARRAY['enrollments'])"
echo "-- the view did not move (user_id stays; the stored value beside it caught up):"
psql -c "SELECT instance, id, user_id, original_user_id, workflow_state FROM cd2.enrollments WHERE user_id = $NEW ORDER BY id"
echo "-- the feed: updates of original_user_id only, cause sync; no delete, no insert:"
psql -c "SELECT position, op, key, changed, cause FROM cd2_feed_read('sis') ORDER BY position"
psql -c "SELECT cd2_feed_ack('sis', (SELECT max(position) FROM cd2_feed_read('sis')))" -c "SELECT * FROM cd2sync.feeds"
echo "-- \"everything of this person\" is an index scan on each instance's table (a table of a"
echo "-- few hundred rows is cheaper read whole: the plan below turns that off, as a large table would):"
psql -c "SET enable_seqscan = off" -c "EXPLAIN (COSTS OFF) SELECT * FROM cd2.enrollments WHERE user_id = $NEW"

echo "== sync log (latest run)"
psql -c "SELECT run_id, instance, table_name, mode, rows_upserted, rows_deleted, objects, bytes_downloaded, round(seconds::numeric, 3) AS seconds
           FROM cd2sync.sync_log WHERE run_id = (SELECT max(run_id) FROM cd2sync.runs) ORDER BY table_name"
echo "== done"
