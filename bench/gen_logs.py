#!/usr/bin/env python3
"""Data generator of the cd2sync benchmark's web_logs figure (python3 standard library only).

Writes, for a `canvas_logs.web_logs` table with the emulator's schema (a UUID key, the request
time, users, course, url, method, status, user agent, ...):

  schema.json                 {"version", "schema"}
  snapshot/part-00000.tsv.gz  a small first snapshot (--snapshot rows over the day before AT)
  inc/part-NNNNN.tsv.gz       an incremental of --rows new records (header meta.ts, meta.action,
                              key.id, value.<col>...), requests spread over the 4 hours after AT
  inc.copy                    the same rows for the COPY baseline: COPY text, no header, no
                              meta fields, the table's column order (id first)
  manifest.json               times, files, counts, sizes (written last: its presence means
                              the directory is complete)

Output goes to <root>/logs-r<rows>-v<GEN_VERSION>; a complete directory is reused. Prints it.

    python3 gen_logs.py --root /tmp/cd2sync-bench-data --rows 5000000 [--jobs 2]
"""
import argparse
import gzip
import json
import multiprocessing
import os
import random
import sys
import time
from datetime import datetime, timedelta, timezone

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "test", "emulator"))
from cd2emu import DEMO_NS_SCHEMAS  # noqa: E402

GEN_VERSION = 1
SEED = 20261201
AT = datetime(2026, 11, 1, tzinfo=timezone.utc)
SNAPSHOT_AT = "2026-11-01T00:00:00Z"
INC_UNTIL = "2026-11-01T04:00:00Z"
PART_ROWS = 500_000
N = "\\N"

SCHEMA = {"version": 1, "schema": DEMO_NS_SCHEMAS["canvas_logs.web_logs"]}
VALUE_COLS = list(SCHEMA["schema"]["properties"]["value"]["properties"])

AGENTS = ["Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0.0.0 Safari/537.36",
          "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Safari/605.1.15",
          "Mozilla/5.0 (X11; Linux x86_64; rv:132.0) Gecko/20100101 Firefox/132.0",
          "iCanvas/7.12 (com.instructure.icanvas; build:2342; iOS 18.1.1) Alamofire/5.9.1",
          "Mozilla/5.0 (compatible; \"Campus Analytics\" crawler/1.0; +https://example.invalid/bot, ops@example.invalid)",
          "python-requests/2.32.3", "curl/8.5.0"]
ROUTES = [("courses", "show", "/courses/%d"), ("assignments", "show", "/courses/%d/assignments/%d"),
          ("submissions", "create", "/courses/%d/assignments/%d/submissions"),
          ("files", "show", "/courses/%d/files/%d/download?download_frd=1"),
          ("discussion_topics", "index", "/courses/%d/discussion_topics?page=%d"),
          ("users", "activity_stream", "/api/v1/users/self/activity_stream?only_active_courses=true&n=%d&m=%d"),
          ("quizzes", "show", "/courses/%d/quizzes/%d"), ("info", "health_check", "/health_check?%d=%d")]
METHODS = ["GET"] * 8 + ["POST", "PUT", "DELETE", "PATCH", "HEAD"]


def uuid4(r):
    b = r.getrandbits(128)
    return "%08x-%04x-4%03x-%04x-%012x" % (b >> 96, (b >> 80) & 0xffff, (b >> 68) & 0xfff,
                                           0x8000 | ((b >> 52) & 0x3fff), b & 0xffffffffffff)


def ts_text(t):
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + "%06dZ" % t.microsecond


def record(r, t):
    """One request at time t: (id, {column: TSV text})."""
    course = 5_000_000 + r.randrange(20_000)
    user = 1_000_000 + r.randrange(400_000) if r.random() < 0.93 else None
    ctl, act, path = ROUTES[r.randrange(len(ROUTES))]
    assignment = 60_000_000 + r.randrange(200_000) if ctl in ("assignments", "submissions") else None
    v = {
        "timestamp": ts_text(t), "timestamp_year": t.strftime("%Y"), "timestamp_month": t.strftime("%Y-%m"),
        "timestamp_day": t.strftime("%Y-%m-%d"),
        "user_id": str(user) if user else N,
        "real_user_id": str(1_000_000 + r.randrange(400_000)) if r.random() < 0.01 else N,
        "course_id": str(course) if ctl not in ("users", "info") else N,
        "quiz_id": str(80_000_000 + r.randrange(50_000)) if ctl == "quizzes" else N,
        "discussion_id": N, "conversation_id": N,
        "assignment_id": str(assignment) if assignment else N,
        "url": path % (course, assignment or r.randrange(1000)) if path.count("%d") == 2 else path % course,
        "http_method": METHODS[r.randrange(len(METHODS))],
        "http_status": "200" if r.random() < 0.9 else r.choice(["302", "304", "401", "404", "500"]),
        "http_version": "HTTP/2.0" if r.random() < 0.7 else "HTTP/1.1",
        "remote_ip": "10.%d.%d.%d" % (r.randrange(256), r.randrange(256), r.randrange(256)),
        "interaction_micros": str(r.randrange(5_000, 3_000_000)),
        "web_application_controller": ctl, "web_application_action": act,
        "web_application_context_type": "Course" if ctl not in ("users", "info") else "User",
        "web_application_context_id": str(course) if ctl not in ("users", "info") else (str(user) if user else N),
        "user_agent": AGENTS[r.randrange(len(AGENTS))].replace("\\", "\\\\"),
        "session_id": uuid4(r), "request_id": uuid4(r),
        "developer_key_id": str(170_000 + r.randrange(20)) if r.random() < 0.05 else N,
        "participated": "true" if ctl == "submissions" else "false",
        "account_id": "1",
    }
    return uuid4(r), v


def write_part(args):
    """(directory, name, part, rows, start, seconds): a gzip TSV part, and for the incremental
    its rows as COPY text"""
    d, name, part, n, start, span = args
    r = random.Random(SEED * 1000 + part * 7 + (name == "inc"))
    header = "\t".join(["meta.ts", "meta.action", "key.id"] + ["value." + c for c in VALUE_COLS]) + "\n"
    raw = len(header)
    gz_path = os.path.join(d, name, "part-%05d.tsv.gz" % part)
    plain_path = os.path.join(d, "inc.copy.%05d" % part)
    step = span / max(n, 1)
    base = start + timedelta(seconds=part * n * step)
    with gzip.open(gz_path + ".tmp", "wb", compresslevel=6) as gz, \
            open(plain_path if name == "inc" else os.devnull, "wb") as plain:
        gz.write(header.encode())
        for b in range(0, n, 5000):
            gl, pl = [], []
            for k in range(b, min(n, b + 5000)):
                t = base + timedelta(seconds=k * step)
                i, v = record(r, t)
                line = i + "\t" + "\t".join(v.get(c, N) for c in VALUE_COLS) + "\n"
                pl.append(line)
                gl.append(ts_text(t + timedelta(seconds=30)) + "\tU\t" + line)
            gb = "".join(gl).encode()
            gz.write(gb)
            plain.write("".join(pl).encode())
            raw += len(gb)
    os.replace(gz_path + ".tmp", gz_path)
    return gz_path, raw, os.path.getsize(gz_path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--snapshot", type=int, default=10_000)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    a = ap.parse_args()
    d = os.path.join(a.root, "logs-r%d-v%d" % (a.rows, GEN_VERSION))
    if os.path.exists(os.path.join(d, "manifest.json")):
        print(d)
        return
    for sub in ("snapshot", "inc"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    with open(os.path.join(d, "schema.json"), "w") as f:
        json.dump(SCHEMA, f, ensure_ascii=False, indent=1)
    t0 = time.time()
    parts = max(1, (a.rows + PART_ROWS - 1) // PART_ROWS)
    tasks = [(d, "snapshot", 0, a.snapshot, AT - timedelta(days=1), 86000.0)] + \
            [(d, "inc", p, a.rows // parts + (1 if p < a.rows % parts else 0), AT + timedelta(seconds=60),
              (4 * 3600 - 180) / parts) for p in range(parts)]
    with multiprocessing.Pool(a.jobs) as pool:
        out = pool.map(write_part, tasks, chunksize=1)
    with open(os.path.join(d, "inc.copy.tmp"), "wb") as o:
        for p in range(parts):
            path = os.path.join(d, "inc.copy.%05d" % p)
            with open(path, "rb") as f:
                while True:
                    chunk = f.read(1 << 22)
                    if not chunk:
                        break
                    o.write(chunk)
            os.remove(path)
    os.replace(os.path.join(d, "inc.copy.tmp"), os.path.join(d, "inc.copy"))
    manifest = {"rows": a.rows, "snapshot_rows": a.snapshot, "columns": ["id"] + VALUE_COLS,
                "snapshot": {"at": SNAPSHOT_AT, "files": [out[0][0]]},
                "inc": {"since": SNAPSHOT_AT, "until": INC_UNTIL, "files": [o[0] for o in out[1:]],
                        "raw_bytes": sum(o[1] for o in out[1:]), "gz_bytes": sum(o[2] for o in out[1:]),
                        "plain_bytes": os.path.getsize(os.path.join(d, "inc.copy"))},
                "seconds": round(time.time() - t0, 1)}
    with open(os.path.join(d, "manifest.json.tmp"), "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(os.path.join(d, "manifest.json.tmp"), os.path.join(d, "manifest.json"))
    print(d)


if __name__ == "__main__":
    main()
