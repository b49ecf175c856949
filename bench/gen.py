#!/usr/bin/env python3
"""Data generator of the cd2sync benchmark (python3 standard library only).

Writes, for a `submissions`-like CD2 table of --rows rows (about 30 columns: bigint ids,
timestamps, an enum, doubles, int32/int16, booleans, text averaging ~300 bytes with unicode
and escapes, a jsonb object):

  schema.json                 {"version", "schema"}: the CD2 schema (draft-07, key/value/meta)
  snapshot/part-NNNNN.tsv.gz  the snapshot as the DAP API serves it: gzip TSV parts, COPY text
                              escaping, header meta.ts, key.id, value.<col>...
  snapshot.copy               the same rows for the COPY baseline: COPY text format, no header,
                              no meta.ts, columns in the table's order (id first)
  inc1/part-NNNNN.tsv.gz      an incremental of --changes records (header meta.ts, meta.action,
                              key.id, value.<col>...): 90% updates of existing ids (changed
                              values), 5% inserts (new ids), 5% deletes (action D, key only)
  inc1-upserts.copy           its U records, table order (plain, for the hand-written SQL)
  inc1-deletes.copy           its D keys, one id a line
  noop/part-NNNNN.tsv.gz      a no-op incremental: --changes U records of rows live after
                              inc1, with exactly the values stored by then
  noop-upserts.copy, noop-deletes.copy (empty)
  manifest.json               times, columns, counts, sizes (written last: its presence means
                              the directory is complete)

Every value is a function of (id, version), so later incrementals can repeat stored values.
Output goes to <root>/r<rows>-c<changes>-v<GEN_VERSION>; a complete directory is reused.
Prints that directory on stdout.

    python3 gen.py --root /tmp/cd2sync-bench-data --rows 1000000 --changes 100000 [--jobs 2]
"""
import argparse
import gzip
import json
import multiprocessing
import os
import random
import shutil
import sys
import time
from datetime import datetime, timedelta, timezone

# the emulator's schema helpers: one way to write a CD2 property
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "test", "emulator"))
from cd2emu import _p  # noqa: E402

GEN_VERSION = 1
SEED = 20261101
ID_BASE = 10_000_000
SNAPSHOT_AT = "2026-11-01T00:00:00Z"
INC1_UNTIL = "2026-11-01T04:00:00Z"
NOOP_UNTIL = "2026-11-01T08:00:00Z"
SNAPSHOT_PARTS = 6
INC_PARTS = 2
BATCH = 5000

WORKFLOW = ["submitted", "graded", "pending_review", "unsubmitted", "deleted"]
SUBMISSION_TYPES = ["online_text_entry", "online_upload", "online_url", "online_quiz", "media_recording",
                    "basic_lti_launch"]


def I64(desc):
    return _p("integer", desc, "int64")


def TS(desc):
    return _p("string", desc, "date-time")


# value columns, in schema (and table) order; the key is "id"
VALUE_PROPS = {
    "assignment_id": I64("The assignment this submission is for."),
    "user_id": I64("The user who submitted."),
    "course_id": I64("The course of the assignment."),
    "grader_id": I64("The user who graded the submission."),
    "group_id": I64("The group, for group assignments."),
    "attachment_id": I64("The uploaded file, for online_upload."),
    "grading_period_id": I64("The grading period."),
    "workflow_state": _p("string", "State of the submission.", enum=WORKFLOW),
    "submission_type": _p("string", "How it was submitted.", enum=SUBMISSION_TYPES),
    "body": _p("string", "The submitted text (online_text_entry)."),
    "url": _p("string", "The submitted URL (online_url)."),
    "grade": _p("string", "The grade, as displayed.", maxLength=255),
    "score": _p("number", "The raw score.", "float64"),
    "published_score": _p("number", "The score as published.", "float64"),
    "points_deducted": _p("number", "Points deducted by the late policy.", "float64"),
    "attempt": _p("integer", "The attempt number.", "int32"),
    "extra_attempts": _p("integer", "Extra attempts allowed.", "int32"),
    "process_attempts": _p("integer", "Times the submission was processed.", "int16"),
    "excused": _p("boolean", "Whether the student is excused."),
    "grade_matches_current_submission": _p("boolean", "Whether the grade is for the latest attempt."),
    "late_policy_status": _p("string", "late, missing or none.", maxLength=16),
    "submitted_at": TS("When it was submitted."),
    "graded_at": TS("When it was graded."),
    "posted_at": TS("When the grade was posted."),
    "cached_due_date": TS("The effective due date."),
    "created_at": TS("Timestamp of creation."),
    "updated_at": TS("Timestamp of the last update."),
    "turnitin_data": _p("object", "Originality report data."),
    "anonymous_id": _p("string", "Anonymous id for anonymous grading.", maxLength=5),
}
COLUMNS = ["id"] + list(VALUE_PROPS)
REQUIRED = ["assignment_id", "user_id", "course_id", "workflow_state", "process_attempts",
            "grade_matches_current_submission", "created_at", "updated_at"]


def schema_doc():
    return {"version": 1, "schema": {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "submissions", "description": "Submissions (cd2sync benchmark data)",
        "type": "object",
        "properties": {
            "key": {"type": "object", "properties": {"id": I64("The submission id.")}, "required": ["id"]},
            "value": {"type": "object", "properties": VALUE_PROPS, "required": REQUIRED},
            "meta": {"type": "object", "properties": {
                "ts": TS("Commit time of the latest change."),
                "action": _p("string", "U (upsert) or D (delete)", enum=["U", "D"])}},
        }}}


def tsv(s: str) -> str:
    """COPY text format escaping."""
    return s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


# ---- pools built once, deterministically (pre-escaped for TSV) ---------------------------------
WORDS = ("the answer is below; see attached file essay draft final revision question "
         "énoncé réponse naïve café façade Übung Größe ñandú año 日本語 のテキスト 学生 作业 "
         "ответ задача Ελληνικά λέξη 🎓 ✓ — “quoted” 'single' \"double\" 42 3.14 x^2 f(x) "
         "C:\\Users\\student\\work.docx a\\b \\N NULL null <p>html</p> &amp; 100% #tag @user").split(" ")


def _pools():
    rng = random.Random(SEED)
    long_, short = [], []
    for i in range(2048):
        n = int(rng.random() ** 1.6 * 95) + 3  # skewed: many short texts, some long ones
        parts = []
        for j in range(n):
            w = WORDS[int(rng.random() * len(WORDS))]
            r = rng.random()
            sep = " " if r < 0.9 else ("\n" if r < 0.95 else ("\t" if r < 0.98 else "\r\n"))
            parts.append(w + sep)
        long_.append(tsv("".join(parts)))
    for i in range(1024):
        n = int(rng.random() * 8) + 1
        short.append(tsv(" ".join(WORDS[int(rng.random() * len(WORDS))] for _ in range(n))))
    jsons = []
    for i in range(512):
        d = {"similarity_score": round(rng.random() * 100, 2),
             "state": rng.choice(["none", "acceptable", "warning", "problem", "failure"]),
             "report_url": f"https://example.invalid/report/{i}?a=1&b=\"q\"",
             "status": rng.choice(["scored", "pending", "error"])}
        if rng.random() < 0.3:
            d["tags"] = ["late", "résumé", 'a "quote"', "back\\slash"][: 1 + int(rng.random() * 4)]
        if rng.random() < 0.2:
            d["nested"] = {"attempts": [1, 2, 3], "ok": rng.random() < 0.5, "note": None}
        jsons.append(tsv(json.dumps(d, ensure_ascii=False, separators=(",", ":"))))
    grades = [f"{x / 2:g}" for x in range(0, 201)] + ["A", "A-", "B+", "B", "C", "complete", "incomplete",
                                                       "pass", "fail", "Très bien"]
    return long_, short, jsons, grades


LONG, SHORT, JSONS, GRADES = _pools()
N_LONG, N_SHORT, N_JSON, N_GRADES = len(LONG), len(SHORT), len(JSONS), len(GRADES)

EPOCH = datetime(2019, 1, 1, tzinfo=timezone.utc)
DAYS = [(EPOCH + timedelta(days=d)).strftime("%Y-%m-%dT") for d in range(3000)]
T_SNAPSHOT = (datetime(2026, 11, 1, tzinfo=timezone.utc) - EPOCH).total_seconds()
SPAN = T_SNAPSHOT - 3600


def ts_text(sec: float, ms: bool) -> str:
    s = int(sec)
    d, r = divmod(s, 86400)
    h, r = divmod(r, 3600)
    m, r = divmod(r, 60)
    if ms:
        return "%s%02d:%02d:%02d.%03dZ" % (DAYS[d], h, m, r, int((sec - s) * 1000))
    return "%s%02d:%02d:%02dZ" % (DAYS[d], h, m, r)


N = "\\N"


def row(i: int, ver: int):
    """The fields of submission id i at version ver (0: snapshot; 1: after inc1), in table order
    without the id, TSV-escaped; and updated_at (seconds since EPOCH)."""
    s = random.Random(i).random            # stable over versions
    v = random.Random(i * 8 + ver + 1).random  # what an update changes
    course = int(s() * 20000) + 1
    created = s() * (SPAN - 86400 * 30)
    if ver == 0:
        updated = created + v() * (SPAN - created)
    else:  # updated within the first incremental's window
        updated = T_SNAPSHOT + 60 + v() * (4 * 3600 - 120)
    state = WORKFLOW[int(v() * 5)] if v() < 0.5 else ("graded" if v() < 0.6 else WORKFLOW[int(v() * 5)])
    submitted = state != "unsubmitted"
    graded = state == "graded"
    stype = SUBMISSION_TYPES[int(v() * 6)] if submitted else None
    r = v()
    if r < 0.08:
        body = N
    elif r < 0.1:
        body = ""
    else:
        body = LONG[int(v() * N_LONG)] + " " + SHORT[int(v() * N_SHORT)] + " #" + str(i)
    score = int(v() * 2001) / 20 if graded else None
    sub_at = created + v() * (updated - created) if submitted else None
    f = [
        str(1_000_000 + course * 10 + int(s() * 10)),                        # assignment_id
        str(5_000_000 + int(s() * 400_000)),                                 # user_id
        str(course),                                                         # course_id
        str(5_000_000 + int(v() * 2000)) if graded else N,                   # grader_id
        str(9_000_000 + int(s() * 50_000)) if s() < 0.1 else N,              # group_id
        str(70_000_000 + i) if stype == "online_upload" else N,              # attachment_id
        str(300 + int(s() * 40)) if s() < 0.7 else N,                        # grading_period_id
        state,                                                               # workflow_state
        stype or N,                                                          # submission_type
        body,                                                                # body
        ("https://example.invalid/s/%d?q=%d" % (i, ver)) if stype == "online_url" else N,  # url
        GRADES[int(v() * N_GRADES)] if graded else N,                        # grade
        repr(score) if score is not None else N,                             # score
        repr(score) if score is not None and v() < 0.9 else N,               # published_score
        repr(int(v() * 41) / 4) if v() < 0.2 else N,                         # points_deducted
        str(1 + int(v() * 5)) if submitted else N,                           # attempt
        str(int(s() * 3)) if s() < 0.3 else N,                               # extra_attempts
        str(int(v() * 3)),                                                   # process_attempts
        ("true" if v() < 0.03 else "false") if v() < 0.95 else N,            # excused
        "true" if v() < 0.9 else "false",                                    # grade_matches_current_submission
        ("late" if v() < 0.5 else "missing") if v() < 0.15 else ("none" if v() < 0.5 else N),
        ts_text(sub_at, v() < 0.3) if sub_at is not None else N,             # submitted_at
        ts_text(updated, False) if graded else N,                            # graded_at
        ts_text(updated, True) if graded and v() < 0.8 else N,               # posted_at
        ts_text(created + 86400 * 14, False) if s() < 0.8 else N,            # cached_due_date
        ts_text(created, s() < 0.2),                                         # created_at
        ts_text(updated, v() < 0.2),                                         # updated_at
        JSONS[int(v() * N_JSON)] if v() < 0.3 else N,                        # turnitin_data
        "%05x" % (int(s() * 0xfffff)) if s() < 0.5 else N,                   # anonymous_id
    ]
    return f, updated


# ---- writers (run in worker processes) -----------------------------------------------------------
def write_snapshot_part(args):
    d, part, lo, hi = args
    gz_path = os.path.join(d, "snapshot", "part-%05d.tsv.gz" % part)
    plain_path = os.path.join(d, "snapshot.copy.%05d" % part)
    header = "\t".join(["meta.ts", "key.id"] + ["value." + c for c in COLUMNS[1:]]) + "\n"
    raw = len(header.encode())
    with gzip.open(gz_path + ".tmp", "wb", compresslevel=6) as gz, open(plain_path, "wb") as plain:
        gz.write(header.encode())
        for b in range(lo, hi, BATCH):
            gl, pl = [], []
            for k in range(b, min(hi, b + BATCH)):
                i = ID_BASE + k
                f, updated = row(i, 0)
                line = str(i) + "\t" + "\t".join(f) + "\n"
                pl.append(line)
                gl.append(ts_text(updated, False) + "\t" + line)
            pb, gb = "".join(pl).encode(), "".join(gl).encode()
            plain.write(pb)
            gz.write(gb)
            raw += len(gb)
    os.replace(gz_path + ".tmp", gz_path)
    return raw


def write_inc_part(args):
    """records: [(id, action, version, meta_ts seconds)]"""
    d, name, part, records = args
    gz_path = os.path.join(d, name, "part-%05d.tsv.gz" % part)
    nulls = "\t".join([N] * (len(COLUMNS) - 1))
    header = "\t".join(["meta.ts", "meta.action", "key.id"] + ["value." + c for c in COLUMNS[1:]]) + "\n"
    raw = len(header.encode())
    ups, dels = [], []
    with gzip.open(gz_path + ".tmp", "wb", compresslevel=6) as gz:
        gz.write(header.encode())
        gl = []
        for i, action, ver, mts in records:
            if action == "D":
                gl.append("%s\tD\t%d\t%s\n" % (ts_text(mts, False), i, nulls))
                dels.append("%d\n" % i)
            else:
                f, _u = row(i, ver)
                line = str(i) + "\t" + "\t".join(f) + "\n"
                ups.append(line)
                gl.append(ts_text(mts, False) + "\tU\t" + line)
        gb = "".join(gl).encode()
        gz.write(gb)
        raw += len(gb)
    os.replace(gz_path + ".tmp", gz_path)
    return raw, "".join(ups).encode(), "".join(dels).encode()


def concat(paths, out):
    with open(out + ".tmp", "wb") as o:
        for p in paths:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, o, 1 << 22)
            os.remove(p)
    os.replace(out + ".tmp", out)


def generate(d, rows, changes, jobs):
    os.makedirs(os.path.join(d, "snapshot"), exist_ok=True)
    os.makedirs(os.path.join(d, "inc1"), exist_ok=True)
    os.makedirs(os.path.join(d, "noop"), exist_ok=True)
    with open(os.path.join(d, "schema.json"), "w") as f:
        json.dump(schema_doc(), f, ensure_ascii=False, indent=1)
    t0 = time.time()
    parts = min(SNAPSHOT_PARTS, max(1, rows))
    tasks = [(d, p, rows * p // parts, rows * (p + 1) // parts) for p in range(parts)]
    with multiprocessing.Pool(jobs) as pool:
        snap_raw = pool.map(write_snapshot_part, tasks, chunksize=1)
        concat([os.path.join(d, "snapshot.copy.%05d" % p) for p in range(parts)],
               os.path.join(d, "snapshot.copy"))
        t1 = time.time()

        # inc1: 90% updates, 5% inserts, 5% deletes
        rng = random.Random(SEED + 1)
        n_ins = changes * 5 // 100
        n_del = changes * 5 // 100
        n_upd = changes - n_ins - n_del
        if n_upd + n_del > rows:
            sys.exit(f"gen.py: --changes {changes} is too many for --rows {rows}")
        picked = rng.sample(range(rows), n_upd + n_del)
        upd = [ID_BASE + k for k in picked[:n_upd]]
        dele = [ID_BASE + k for k in picked[n_upd:]]
        ins = [ID_BASE + rows + k for k in range(n_ins)]
        win = 4 * 3600 - 120
        recs = [(i, "U", 1, row(i, 1)[1]) for i in upd + ins] + \
               [(i, "D", 1, T_SNAPSHOT + 60 + rng.random() * win) for i in dele]
        recs.sort(key=lambda r: (int(r[3]), r[0]))  # CD2 order: by ts, then key
        inc_raw = write_incremental(pool, d, "inc1", recs)

        # noop: rows live after inc1, with the values stored by then
        changed = set(upd) | set(ins)
        deleted = set(dele)
        live = [i for i in (ID_BASE + k for k in rng.sample(range(rows + n_ins), min(rows + n_ins, changes + n_del)))
                if i not in deleted][:changes]
        t_inc1 = T_SNAPSHOT + 4 * 3600
        recs = sorted(((i, "U", 1 if i in changed else 0, t_inc1 + 60 + rng.random() * win) for i in live),
                      key=lambda r: (int(r[3]), r[0]))
        noop_raw = write_incremental(pool, d, "noop", recs)
    t2 = time.time()

    def files(sub):
        return sorted(os.path.join(d, sub, f) for f in os.listdir(os.path.join(d, sub)) if f.endswith(".gz"))

    def size(paths):
        return sum(os.path.getsize(p) for p in paths)

    man = {
        "gen_version": GEN_VERSION, "rows": rows, "changes": changes, "columns": COLUMNS,
        "snapshot": {"at": SNAPSHOT_AT, "files": files("snapshot"), "rows": rows,
                     "raw_bytes": sum(snap_raw), "gz_bytes": size(files("snapshot")),
                     "plain": os.path.join(d, "snapshot.copy"),
                     "plain_bytes": os.path.getsize(os.path.join(d, "snapshot.copy"))},
        "inc1": {"since": SNAPSHOT_AT, "until": INC1_UNTIL, "files": files("inc1"),
                 "updates": n_upd, "inserts": n_ins, "deletes": n_del,
                 "raw_bytes": inc_raw, "gz_bytes": size(files("inc1")),
                 "plain_upserts": os.path.join(d, "inc1-upserts.copy"),
                 "plain_deletes": os.path.join(d, "inc1-deletes.copy")},
        "noop": {"since": INC1_UNTIL, "until": NOOP_UNTIL, "files": files("noop"), "updates": len(live),
                 "raw_bytes": noop_raw, "gz_bytes": size(files("noop")),
                 "plain_upserts": os.path.join(d, "noop-upserts.copy"),
                 "plain_deletes": os.path.join(d, "noop-deletes.copy")},
        "seconds": {"snapshot": round(t1 - t0, 1), "incrementals": round(t2 - t1, 1)},
    }
    with open(os.path.join(d, "manifest.json.tmp"), "w") as f:
        json.dump(man, f, indent=1)
    os.replace(os.path.join(d, "manifest.json.tmp"), os.path.join(d, "manifest.json"))
    return man


def write_incremental(pool, d, name, recs):
    parts = min(INC_PARTS, max(1, len(recs)))
    tasks = [(d, name, p, recs[len(recs) * p // parts: len(recs) * (p + 1) // parts]) for p in range(parts)]
    raw = 0
    with open(os.path.join(d, name + "-upserts.copy"), "wb") as up, \
            open(os.path.join(d, name + "-deletes.copy"), "wb") as de:
        for r, u, dl in pool.map(write_inc_part, tasks, chunksize=1):
            raw += r
            up.write(u)
            de.write(dl)
    return raw


def main():
    ap = argparse.ArgumentParser(description="cd2sync benchmark data generator")
    ap.add_argument("--root", default=os.environ.get("BENCH_DATA", "/tmp/cd2sync-bench-data"))
    ap.add_argument("--rows", type=int, default=int(os.environ.get("BENCH_ROWS", 1_000_000)))
    ap.add_argument("--changes", type=int, default=int(os.environ.get("BENCH_CHANGES", 100_000)))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    if args.rows < 1 or args.changes < 1:
        ap.error("--rows and --changes must be positive")
    d = os.path.join(os.path.abspath(args.root), f"r{args.rows}-c{args.changes}-v{GEN_VERSION}")
    if os.path.exists(os.path.join(d, "manifest.json")):
        print(d)
        return
    if os.path.exists(d):
        shutil.rmtree(d)  # an interrupted run
    os.makedirs(d, mode=0o755)
    t = time.time()
    man = generate(d, args.rows, args.changes, args.jobs)
    print(f"gen.py: {args.rows} rows, {args.changes} changes in {time.time() - t:.1f}s "
          f"(snapshot {man['snapshot']['raw_bytes'] / 1048576:.0f} MB as TSV, "
          f"{man['snapshot']['gz_bytes'] / 1048576:.0f} MB gzip) -> {d}", file=sys.stderr)
    print(d)


if __name__ == "__main__":
    main()
