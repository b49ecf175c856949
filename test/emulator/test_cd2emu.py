#!/usr/bin/env python3
"""Self-test of cd2emu.py: starts the server in-process on port 0 and exercises every endpoint,
format and fault kind with urllib / http.client + gzip + csv + json. Run:

    python3 -m unittest -v test_cd2emu      (from this directory)   or   python3 test_cd2emu.py
"""
import base64
import csv
import gzip
import http.client
import io
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import cd2emu  # noqa: E402

NORTH, NORTH_SECRET = "us-east-1#demo-north", "north-secret"
SOUTH, SOUTH_SECRET = "us-east-1#demo-south", "south-secret"
DEMO = cd2emu.demo_scenario()
CANVAS_TABLES = {"accounts", "users", "courses", "enrollments", "submissions", "pseudonyms"}
OTHER_TABLES = ["canvas_logs.web_logs", "new_quizzes.quizzes", "new_quizzes.quiz_sessions",
                "catalog.products", "catalog.users", "catalog.enrollments"]


class Resp:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


def gunzip_all(data: bytes) -> bytes:
    """Decompress every concatenated gzip member (strict: raises on damage / truncation)."""
    out, rest = [], data
    while rest:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out.append(d.decompress(rest))
        if not d.eof:
            raise EOFError("truncated gzip member")
        out.append(d.flush())
        rest = d.unused_data
    return b"".join(out)


def gzip_members(data: bytes) -> int:
    n, rest = 0, data
    while rest:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        d.decompress(rest)
        n += 1
        rest = d.unused_data
    return n


def parse_tsv_field(s):
    if s == "\\N":
        return None
    out, i = [], 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            out.append({"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}.get(s[i + 1], s[i + 1]))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def parse_csv_records(text: str):
    """RFC 4180 with NULL = empty unquoted field, "" = empty string."""
    rows, row, field, i, quoted, was_quoted = [], [], [], 0, False, False
    while i < len(text):
        c = text[i]
        if quoted:
            if c == '"':
                if i + 1 < len(text) and text[i + 1] == '"':
                    field.append('"')
                    i += 1
                else:
                    quoted = False
            else:
                field.append(c)
        elif c == '"':
            quoted, was_quoted = True, True
        elif c == ",":
            row.append("".join(field) if (field or was_quoted) else None)
            field, was_quoted = [], False
        elif c in "\r\n":
            if c == "\r" and i + 1 < len(text) and text[i + 1] == "\n":
                i += 1
            row.append("".join(field) if (field or was_quoted) else None)
            rows.append(row)
            row, field, was_quoted = [], [], False
        else:
            field.append(c)
        i += 1
    if field or row or was_quoted:
        row.append("".join(field) if (field or was_quoted) else None)
        rows.append(row)
    return rows


class EmuTestCase(unittest.TestCase):
    server = None

    @classmethod
    def setUpClass(cls):
        cls.server = cd2emu.make_server(0, None, quiet=True)
        cls.port = cls.server.server_address[1]
        cls.base = f"http://127.0.0.1:{cls.port}"
        cls.thread = threading.Thread(target=cls.server.serve_forever, kwargs={"poll_interval": 0.1},
                                      daemon=True)
        cls.thread.start()

    @classmethod
    def tearDownClass(cls):
        cls.server.shutdown()
        cls.server.server_close()

    def setUp(self):
        self.ctl("POST", "/_emu/reset")
        self.ctl("POST", "/_emu/load", DEMO)
        self.ctl("POST", "/_emu/config", {"job_latency": 0})
        self._tokens = {}

    # -- helpers ---------------------------------------------------------------------------------
    def req(self, method, url, body=None, headers=None, timeout=10):
        if not url.startswith("http"):
            url = self.base + url
        data = None
        headers = dict(headers or {})
        if body is not None:
            if isinstance(body, (bytes, str)):
                data = body.encode() if isinstance(body, str) else body
            else:
                data = json.dumps(body).encode()
                headers.setdefault("Content-Type", "application/json")
        r = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(r, timeout=timeout) as f:
                return Resp(f.status, f.headers, f.read())
        except urllib.error.HTTPError as e:
            return Resp(e.code, e.headers, e.read())

    def ctl(self, method, path, body=None):
        r = self.req(method, path, body)
        self.assertLess(r.status, 300, r.body)
        return r.json()

    def login(self, cid=NORTH, secret=NORTH_SECRET):
        basic = base64.b64encode(f"{cid}:{secret}".encode()).decode()
        return self.req("POST", "/ids/auth/login", "grant_type=client_credentials",
                        {"Authorization": "Basic " + basic,
                         "Content-Type": "application/x-www-form-urlencoded"})

    def token(self, cid=NORTH, secret=None):
        secret = secret or {NORTH: NORTH_SECRET, SOUTH: SOUTH_SECRET}[cid]
        if cid not in self._tokens:
            r = self.login(cid, secret)
            self.assertEqual(r.status, 200, r.body)
            self._tokens[cid] = r.json()["access_token"]
        return self._tokens[cid]

    def dap(self, method, path, body=None, cid=NORTH, headers=None):
        h = {"Authorization": "Bearer " + self.token(cid)}
        h.update(headers or {})
        return self.req(method, path, body, h)

    def start_job(self, table, body, cid=NORTH, ns="canvas"):
        return self.dap("POST", f"/dap/query/{ns}/table/{table}/data", body, cid)

    def wait_job(self, job, cid=NORTH):
        deadline = time.time() + 10
        while job["status"] in ("waiting", "running"):
            self.assertLess(time.time(), deadline)
            time.sleep(0.05)
            r = self.dap("GET", f"/dap/job/{job['id']}", cid=cid)
            self.assertEqual(r.status, 200, r.body)
            job = r.json()
        return job

    def urls(self, job, cid=NORTH):
        r = self.dap("POST", "/dap/object/url", job["objects"], cid)
        self.assertEqual(r.status, 200, r.body)
        return r.json()["urls"]

    def download_all(self, job, cid=NORTH):
        """-> list of decompressed file contents, in object order."""
        urls = self.urls(job, cid)
        out = []
        for o in job["objects"]:
            r = self.req("GET", urls[o["id"]]["url"])
            self.assertEqual(r.status, 200)
            self.assertEqual(int(r.headers["Content-Length"]), len(r.body))
            out.append(gunzip_all(r.body))
        return out

    def run_query(self, table, body, cid=NORTH, ns="canvas"):
        r = self.start_job(table, body, cid, ns)
        self.assertEqual(r.status, 200, r.body)
        job = self.wait_job(r.json(), cid)
        self.assertEqual(job["status"], "complete", job)
        return job, self.download_all(job, cid)

    def records(self, fmt, files):
        """Parse files of any format into a list of dicts {key, value, meta} (value None = delete)."""
        recs = []
        for data in files:
            text = data.decode("utf-8")
            if fmt == "jsonl":
                recs += [json.loads(line) for line in text.splitlines() if line]
                continue
            if fmt == "csv":
                rows = parse_csv_records(text)
            else:
                rows = [[parse_tsv_field(f) for f in line.split("\t")] for line in text.split("\n") if line]
            header, body = rows[0], rows[1:]
            for row in body:
                self.assertEqual(len(row), len(header), row)
                rec = {"key": {}, "value": {}, "meta": {}}
                for name, v in zip(header, row):
                    part, _, col = name.partition(".")
                    rec[part][col] = v
                if rec["meta"].get("action") == "D":
                    del rec["value"]
                recs.append(rec)
        return recs

    def state(self, table, cid=NORTH, fresh=False, window=False):
        return self.ctl("GET", f"/_emu/state?client_id={urllib.parse.quote(cid)}&table={table}"
                        + ("&fresh=1" if fresh else "") + ("&window=1" if window else ""))

    # ===== tests =================================================================================
    def test_health_and_control(self):
        h = self.ctl("GET", "/_emu/health")
        self.assertTrue(h["ok"])
        self.assertEqual(h["clock"], "2026-11-01T00:00:00Z")
        cfg = self.ctl("GET", "/_emu/config")
        self.assertEqual(cfg["parts"], 2)
        self.assertEqual(self.req("POST", "/_emu/config", {"nope": 1}).status, 400)
        self.assertEqual(self.req("POST", "/_emu/config", {"parts": 0}).status, 400)
        self.assertEqual(self.req("GET", "/_emu/nothing").status, 404)
        self.assertEqual(self.ctl("POST", "/_emu/load", {"generate": "demo"})["instances"], [NORTH, SOUTH])

    def test_login(self):
        r = self.login()
        self.assertEqual(r.status, 200)
        body = r.json()
        self.assertEqual(body["token_type"], "Bearer")
        self.assertEqual(body["expires_in"], 3600)
        self.assertIn("scope", body)
        hdr, payload, sig = body["access_token"].split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        self.assertEqual(claims["sub"], NORTH)
        self.assertAlmostEqual(claims["exp"], time.time() + 3600, delta=5)
        self.assertEqual(self.login(secret="wrong").status, 401)
        self.assertEqual(self.login(cid="us-east-1#nobody").status, 401)
        self.assertEqual(self.login(cid="nocolon").json()["error"]["type"], "AuthenticationError")
        basic = base64.b64encode(f"{NORTH}:{NORTH_SECRET}".encode()).decode()
        r = self.req("POST", "/ids/auth/login", "grant_type=password", {"Authorization": "Basic " + basic})
        self.assertEqual(r.status, 400)
        # a secret containing ':' (credentials split on the first ':')
        scen = {"instances": {"us-east-1#x": {"secret": "a:b:c", "tables": {}}}}
        self.ctl("POST", "/_emu/load", scen)
        self.assertEqual(self.login("us-east-1#x", "a:b:c").status, 200)

    def test_auth_required(self):
        r = self.req("GET", "/dap/query/canvas/table")
        self.assertEqual(r.status, 401)
        err = r.json()["error"]
        self.assertEqual(err["type"], "AuthenticationError")
        self.assertIn("uuid", err)
        self.assertEqual(self.req("GET", "/dap/query/canvas/table",
                                  headers={"Authorization": "Bearer junk"}).status, 401)
        r = self.req("GET", "/dap/query/canvas/table", headers={"x-instauth": self.token()})
        self.assertEqual(r.status, 200)
        # revoke via control API
        self.assertEqual(self.ctl("POST", "/_emu/revoke", {"client_id": NORTH})["revoked"], 1)
        self.assertEqual(self.dap("GET", "/dap/query/canvas/table").status, 401)
        # expiry
        self._tokens.clear()
        self.ctl("POST", "/_emu/config", {"token_lifetime": 0.3})
        self.assertEqual(self.dap("GET", "/dap/query/canvas/table").status, 200)
        time.sleep(0.35)
        r = self.dap("GET", "/dap/query/canvas/table")
        self.assertEqual(r.status, 401)
        self.assertIn("expired", r.json()["error"]["message"])

    def test_tables_and_schema(self):
        r = self.dap("GET", "/dap/query/canvas/table")
        tables = r.json()["tables"]
        self.assertEqual(tables, sorted(tables))
        self.assertEqual(set(tables), {"accounts", "users", "courses", "enrollments", "submissions", "pseudonyms"})
        r = self.dap("GET", "/dap/query/canvas/table/users/schema")
        self.assertEqual(r.status, 200)
        s = r.json()
        self.assertEqual(s["version"], 1)
        props = s["schema"]["properties"]
        self.assertEqual(set(props), {"key", "value", "meta"})
        for col in ("workflow_state", "deleted_at", "merged_into_user_id"):
            self.assertIn(col, props["value"]["properties"])
        self.assertIn("description", props["value"]["properties"]["name"])
        ep = self.dap("GET", "/dap/query/canvas/table/enrollments/schema").json()["schema"]["properties"]["value"]
        for col in ("user_id", "course_id", "course_section_id", "sis_pseudonym_id", "type", "workflow_state"):
            self.assertIn(col, ep["properties"])
        self.assertIn("required", ep)
        r = self.dap("GET", "/dap/query/canvas/table/nope/schema")
        self.assertEqual(r.status, 404)
        self.assertEqual(r.json()["error"]["type"], "NotFound")
        self.assertEqual(self.dap("GET", "/dap/nothing").status, 404)

    def test_snapshot_all_formats(self):
        expected = self.state("courses")
        by_id = {r["key"]["id"]: r["value"] for r in expected["rows"]}
        for fmt in ("jsonl", "csv", "tsv"):
            with self.subTest(fmt=fmt):
                job, files = self.run_query("courses", {"format": fmt, "mode": "condensed"})
                self.assertEqual(job["at"], "2026-11-01T00:00:00Z")
                self.assertEqual(job["schema_version"], 1)
                self.assertNotIn("since", job)
                self.assertEqual(len(job["objects"]), 3)
                nums = [int(o["id"].rsplit("-", 1)[1].split(".")[0]) for o in job["objects"]]
                self.assertEqual(nums, [0, 3, 7])
                self.assertTrue(all(o["id"].endswith(f".{fmt}.gz") for o in job["objects"]))
                recs = self.records(fmt, files)
                self.assertEqual(len(recs), len(by_id))
                # the middle file is empty (zero bytes for jsonl, header only for csv/tsv)
                if fmt == "jsonl":
                    self.assertEqual(files[1], b"")
                else:
                    self.assertEqual(len(files[1].splitlines()), 1)
                    self.assertTrue(files[1].decode().startswith(("meta.ts", "meta.ts")))
                for rec in recs:
                    self.assertNotIn("action", rec["meta"])
                    self.assertEqual(rec["meta"]["ts"], "2026-11-01T00:00:00Z")
                    kid = int(rec["key"]["id"])
                    want = by_id[kid]
                    for col, v in want.items():
                        got = rec["value"].get(col)
                        if fmt == "jsonl":
                            self.assertEqual(got, v, (kid, col))
                        else:
                            txt = None if v is None else (
                                json.dumps(v, ensure_ascii=False, separators=(",", ":"))
                                if isinstance(v, (list, dict)) else
                                ("true" if v is True else "false" if v is False else
                                 json.dumps(v) if isinstance(v, (int, float)) else v))
                            self.assertEqual(got, txt, (fmt, kid, col))
                if fmt == "jsonl":  # null_style omit: NULL properties absent
                    self.assertTrue(any(len(r["value"]) < len(expected["rows"][0]["value"]) for r in recs))
        # special values made it through unchanged
        values = [r["value"] for r in expected["rows"]]
        self.assertTrue(any(v["syllabus_body"] == "" for v in values))
        self.assertTrue(any(v["syllabus_body"] is None for v in values))
        self.assertTrue(any(v["course_code"] == "\\N" for v in values))
        self.assertTrue(any(v["syllabus_body"] and "\n" in v["syllabus_body"] for v in values))

    def test_csv_tsv_encoding_details(self):
        _job, files = self.run_query("courses", {"format": "csv"})
        text = files[0].decode()
        self.assertTrue(text.startswith("meta.ts,key.id,value.name,"))
        self.assertIn("\r\n", text)
        self.assertIn(',"",', text)           # empty string is quoted
        self.assertIn(",,", text)             # NULL is an empty unquoted field
        # the stdlib csv module agrees on the record structure (embedded newlines inside quotes)
        rows = list(csv.reader(io.StringIO(text, newline="")))
        self.assertTrue(all(len(r) == len(rows[0]) for r in rows))
        self.assertEqual(len(rows) - 1, len(self.records("csv", [files[0]])))
        self.assertTrue(any("\n" in f for r in rows for f in r))
        _job, files = self.run_query("courses", {"format": "tsv"})
        text = files[0].decode() + files[2].decode()
        self.assertIn("\\N", text)
        self.assertIn("\\\\N", text)          # the literal string \N
        self.assertIn("\\t", text)
        self.assertIn("\\n", text)
        # incremental header carries meta.action
        self.ctl("POST", "/_emu/epoch", {})
        job, files = self.run_query("courses", {"format": "csv", "since": "2026-11-01T00:00:00Z"})
        self.assertTrue(files[0].decode().startswith("meta.ts,meta.action,key.id"))

    def test_incremental_upsert_delete(self):
        ep = self.ctl("POST", "/_emu/epoch", {"changes": [{
            "client_id": NORTH, "table": "users",
            "upsert": [{"key": {"id": 1}, "value": {"name": "New «user»", "workflow_state": "registered",
                                                   "created_at": "2026-11-01T00:30:00Z",
                                                   "updated_at": "2026-11-01T00:30:00Z"}},
                       {"key": {"id": 10000000001001}, "value": {"name": "Renamed", "workflow_state": "deleted",
                                                                 "created_at": "2020-01-01T00:00:00Z",
                                                                 "updated_at": "2026-11-01T00:40:00Z"}}],
            "delete": [{"key": {"id": 10000000001002}}]}]})
        self.assertEqual(ep["at"], "2026-11-01T01:00:00Z")
        # a second epoch at an explicit time
        self.assertEqual(self.req("POST", "/_emu/epoch", {"at": "2026-11-01T00:59:00Z"}).status, 400)
        self.ctl("POST", "/_emu/epoch", {"at": "2026-11-01T05:00:00Z", "changes": [
            {"client_id": NORTH, "table": "users", "delete": [{"key": {"id": 1}}]}]})
        for fmt in ("jsonl", "csv", "tsv"):
            with self.subTest(fmt=fmt):
                job, files = self.run_query("users", {"format": fmt, "mode": "condensed",
                                                      "since": "2026-11-01T00:00:00Z",
                                                      "until": "2026-11-01T01:00:00Z"})
                self.assertEqual(job["since"], "2026-11-01T00:00:00Z")
                self.assertEqual(job["until"], "2026-11-01T01:00:00Z")
                self.assertNotIn("at", job)
                recs = self.records(fmt, files)
                acts = {str(r["key"]["id"]): r["meta"]["action"] for r in recs}
                # key 1 was deleted at 05:00 (after until): its latest change is outside the window
                self.assertEqual(acts, {"10000000001001": "U", "10000000001002": "D"})
                for r in recs:
                    self.assertEqual(r["meta"]["ts"], "2026-11-01T01:00:00Z")
                    if r["meta"]["action"] == "D":
                        self.assertNotIn("value", r)
                job, files = self.run_query("users", {"format": fmt, "since": "2026-11-01T01:00:00Z"})
                self.assertEqual(job["until"], "2026-11-01T05:00:00Z")
                recs = self.records(fmt, files)
                self.assertEqual([(str(r["key"]["id"]), r["meta"]["action"]) for r in recs], [("1", "D")])
        # since == until boundary handling
        self.ctl("POST", "/_emu/config", {"since_inclusive": True, "dedupe_jobs": False})
        _job, files = self.run_query("users", {"format": "jsonl", "since": "2026-11-01T05:00:00Z"})
        self.assertEqual(len(self.records("jsonl", files)), 1)
        self.ctl("POST", "/_emu/config", {"since_inclusive": False, "until_inclusive": False})
        _job, files = self.run_query("users", {"format": "jsonl", "since": "2026-11-01T00:00:00Z"})
        self.assertEqual(len(self.records("jsonl", files)), 2)  # the 05:00 delete is excluded
        # the expected state
        st = self.state("users")
        self.assertEqual(st["at"], "2026-11-01T05:00:00Z")
        ids = [r["key"]["id"] for r in st["rows"]]
        self.assertEqual(ids, sorted(ids))
        self.assertNotIn(1, ids)
        self.assertNotIn(10000000001002, ids)
        row = next(r for r in st["rows"] if r["key"]["id"] == 10000000001001)
        self.assertEqual(row["value"]["name"], "Renamed")
        self.assertIsNone(row["value"]["deleted_at"])  # absent in the upsert = NULL
        # snapshot after the changes
        job, files = self.run_query("users", {"format": "jsonl"})
        self.assertEqual(job["at"], "2026-11-01T05:00:00Z")
        self.assertEqual(len(self.records("jsonl", files)), len(st["rows"]))

    def test_empty_incremental(self):
        job, files = self.run_query("accounts", {"format": "jsonl", "since": "2026-11-01T00:00:00Z"})
        self.assertEqual(job["until"], "2026-11-01T00:00:00Z")
        self.assertEqual(files, [b""])  # no data files, one empty file
        self.ctl("POST", "/_emu/config", {"empty_parts": 0, "dedupe_jobs": False})
        job, _ = self.run_query("accounts", {"format": "jsonl", "since": "2026-11-01T00:00:00Z"})
        self.assertEqual(job["objects"], [])

    def test_query_validation(self):
        bad = [{"format": "parquet"}, {"format": "xml"}, {"format": "JSONL"}, {},
               {"format": "jsonl", "since": "yesterday"},
               {"format": "jsonl", "since": "2026-12-01T00:00:00Z"},
               {"format": "jsonl", "until": "2026-11-01T00:00:00Z"},
               {"format": "jsonl", "mode": "expanded"},
               {"format": "jsonl", "since": None},
               {"format": "jsonl", "filter": 1}]
        for body in bad:
            r = self.start_job("users", body)
            self.assertEqual(r.status, 400, body)
            self.assertEqual(r.json()["error"]["type"], "ValidationError")
        r = self.start_job("users", "not json")
        self.assertEqual(r.status, 400)
        self.ctl("POST", "/_emu/config", {"formats": ["jsonl"]})
        self.assertEqual(self.start_job("users", {"format": "tsv"}).status, 400)
        self.assertEqual(self.start_job("nope", {"format": "jsonl"}).status, 404)

    def test_earliest_since(self):
        self.ctl("POST", "/_emu/epoch", {})
        self.ctl("POST", "/_emu/config", {"earliest_since": "2026-11-01T00:30:00Z"})
        r = self.start_job("users", {"format": "jsonl", "since": "2026-11-01T00:00:00Z"})
        self.assertEqual(r.status, 400)
        self.assertEqual(r.json()["error"]["type"], "SnapshotRequired")
        self.assertEqual(r.json()["error"]["since"], "2026-11-01T00:30:00Z")
        self.ctl("POST", "/_emu/config", {"since_too_old_error": "OutOfRange"})
        r = self.start_job("users", {"format": "jsonl", "since": "2026-11-01T00:00:00Z"})
        self.assertEqual(r.json()["error"]["type"], "OutOfRange")
        self.assertEqual(self.start_job("users", {"format": "jsonl", "since": "2026-11-01T00:30:00Z"}).status, 200)

    def test_job_latency_and_dedupe(self):
        self.ctl("POST", "/_emu/config", {"job_latency": 0.3})
        r = self.start_job("accounts", {"format": "jsonl", "mode": "condensed"})
        job = r.json()
        self.assertEqual(job["status"], "waiting")
        self.assertNotIn("objects", job)
        self.assertIn("expires_at", job)
        seen = {job["status"]}
        while job["status"] not in ("complete", "failed"):
            time.sleep(0.05)
            job = self.dap("GET", f"/dap/job/{job['id']}").json()
            seen.add(job["status"])
        self.assertEqual(seen, {"waiting", "running", "complete"})
        # dedupe: the same query returns the same (already complete) job, even after an epoch
        self.ctl("POST", "/_emu/epoch", {})
        again = self.start_job("accounts", {"mode": "condensed", "format": "jsonl"}).json()
        self.assertEqual(again["id"], job["id"])
        self.assertEqual(again["status"], "complete")
        self.assertEqual(again["at"], "2026-11-01T00:00:00Z")
        # another instance never shares jobs
        other = self.start_job("accounts", {"format": "jsonl", "mode": "condensed"}, cid=SOUTH).json()
        self.assertNotEqual(other["id"], job["id"])
        self.assertEqual(self.dap("GET", f"/dap/job/{job['id']}", cid=SOUTH).status, 404)
        self.ctl("POST", "/_emu/config", {"dedupe_jobs": False})
        self.assertNotEqual(self.start_job("accounts", {"format": "jsonl", "mode": "condensed"}).json()["id"],
                            job["id"])
        r = self.dap("GET", "/dap/job/does-not-exist")
        self.assertEqual(r.status, 404)
        self.assertEqual(r.json()["error"]["kind"], "job")

    def test_job_expiry(self):
        self.ctl("POST", "/_emu/config", {"job_lifetime": 0.3})
        job, _ = self.run_query("accounts", {"format": "jsonl"})
        time.sleep(0.35)
        self.assertEqual(self.dap("GET", f"/dap/job/{job['id']}").status, 404)
        r = self.dap("POST", "/dap/object/url", job["objects"])
        self.assertEqual(r.status, 404)
        self.assertEqual(r.json()["error"]["type"], "NotFound")
        # an expired job is not reused by dedupe
        self.assertNotEqual(self.start_job("accounts", {"format": "jsonl"}).json()["id"], job["id"])

    def test_object_urls_and_download(self):
        job, _ = self.run_query("submissions", {"format": "jsonl"})
        urls = self.urls(job)
        self.assertEqual(set(urls), {o["id"] for o in job["objects"]})
        url = urls[job["objects"][0]["id"]]["url"]
        self.assertTrue(url.startswith(f"http://127.0.0.1:{self.port}/_obj/"))
        full = self.req("GET", url)
        self.assertGreater(gzip_members(full.body), 1)  # multi-member gzip
        self.assertEqual(gzip.decompress(full.body), gunzip_all(full.body))
        head = self.req("HEAD", url)
        self.assertEqual((head.status, head.body), (200, b""))
        self.assertEqual(int(head.headers["Content-Length"]), len(full.body))
        jobs = self.ctl("GET", "/_emu/jobs")
        self.assertIn(job["id"], [j["id"] for j in jobs])
        r = self.req("GET", url, headers={"Range": "bytes=10-"})
        self.assertEqual(r.status, 206)
        self.assertEqual(r.body, full.body[10:])
        self.assertEqual(r.headers["Content-Range"], f"bytes 10-{len(full.body) - 1}/{len(full.body)}")
        self.assertEqual(self.req("GET", url, headers={"Range": f"bytes={len(full.body)}-"}).status, 416)
        # unknown object / bad body
        r = self.dap("POST", "/dap/object/url", [{"id": "nope/part-1.jsonl.gz"}])
        self.assertEqual(r.status, 404)
        self.assertEqual(self.dap("POST", "/dap/object/url", {"id": "x"}).status, 400)
        # bad signature
        r = self.req("GET", url[:-3] + "xyz")
        self.assertEqual(r.status, 403)
        self.assertIn(b"<Code>AccessDenied</Code>", r.body)
        # the other instance cannot ask for these objects
        self.assertEqual(self.dap("POST", "/dap/object/url", job["objects"], cid=SOUTH).status, 404)
        # url expiry
        self.ctl("POST", "/_emu/config", {"url_lifetime": 0.2})
        url = self.urls(job)[job["objects"][0]["id"]]["url"]
        self.assertEqual(self.req("GET", url).status, 200)
        time.sleep(0.25)
        r = self.req("GET", url)
        self.assertEqual(r.status, 403)
        self.assertTrue(r.headers["Content-Type"].startswith("application/xml"))
        self.assertIn(b"Request has expired", r.body)
        # multi_member off
        self.ctl("POST", "/_emu/config", {"multi_member": False, "dedupe_jobs": False, "url_lifetime": 900})
        job, _ = self.run_query("submissions", {"format": "jsonl"})
        body = self.req("GET", self.urls(job)[job["objects"][0]["id"]]["url"]).body
        self.assertEqual(gzip_members(body), 1)

    def test_options_null_style_shuffle_parts(self):
        self.ctl("POST", "/_emu/config", {"null_style": "null", "parts": 4, "empty_parts": 2, "shuffle": True})
        job, files = self.run_query("users", {"format": "jsonl"})
        self.assertEqual(len(job["objects"]), 6)
        recs = self.records("jsonl", files)
        self.assertEqual(len(recs), 150)
        ncols = len(DEMO["instances"][NORTH]["tables"]["users"]["schema"]["properties"]["value"]["properties"])
        self.assertTrue(all(len(r["value"]) == ncols for r in recs))  # NULLs written as null
        orders = {tuple(json.loads(line)) for f in files for line in f.decode().splitlines()}
        self.assertGreater(len(orders), 1)  # top-level member order varies
        _job, files = self.run_query("users", {"format": "csv"})
        headers = {f.decode().split("\r\n", 1)[0] for f in files}
        self.assertGreater(len(headers), 1)  # column order varies per file
        self.assertEqual(len(self.records("csv", files)), 150)

    def test_schema_change_and_oversized(self):
        st0 = self.state("courses")
        row0 = st0["rows"][0]
        cid0 = row0["key"]["id"]
        v1 = dict(row0["value"], syllabus_body="small v1")
        v1 = {k: v for k, v in v1.items() if v is not None}
        self.ctl("POST", "/_emu/epoch", {"changes": [{"client_id": NORTH, "table": "courses",
                                                      "upsert": [{"key": {"id": cid0}, "value": v1}]}]})
        # row updated with a huge syllabus: exported truncated; new row born oversized
        big = dict(v1, syllabus_body="x" * 5000)
        self.ctl("POST", "/_emu/epoch", {"changes": [{"client_id": NORTH, "table": "courses",
            "upsert": [{"key": {"id": cid0}, "value": big},
                       {"key": {"id": 42}, "value": dict(v1, storage_quota=1)}],
            "oversized": [{"key": {"id": cid0}, "column": "syllabus_body"},
                          {"key": {"id": 42}, "column": "syllabus_body"},
                          {"key": {"id": 42}, "column": "storage_quota"}]}]})
        job, files = self.run_query("courses", {"format": "jsonl", "since": "2026-11-01T01:00:00Z"})
        recs = {r["key"]["id"]: r for r in self.records("jsonl", files)}
        self.assertEqual(recs[cid0]["value"]["syllabus_body"], cd2emu.PLACEHOLDER)
        self.assertEqual(recs[42]["value"]["storage_quota"], cd2emu.PLACEHOLDER)
        rows = {r["key"]["id"]: r["value"] for r in self.state("courses")["rows"]}
        self.assertEqual(rows[cid0]["syllabus_body"], "small v1")       # the good value kept
        self.assertEqual(rows[42]["syllabus_body"], cd2emu.PLACEHOLDER)  # never seen, string
        self.assertIsNone(rows[42]["storage_quota"])                     # never seen, not a string
        fresh = {r["key"]["id"]: r["value"] for r in self.state("courses", fresh=True)["rows"]}
        self.assertEqual(fresh[cid0]["syllabus_body"], cd2emu.PLACEHOLDER)
        # schema change: drop syllabus_body, add a new column
        sch = json.loads(json.dumps(DEMO["instances"][NORTH]["tables"]["courses"]["schema"]))
        del sch["properties"]["value"]["properties"]["syllabus_body"]
        sch["properties"]["value"]["properties"]["grading_scheme"] = {"type": "string", "description": "new"}
        self.ctl("POST", "/_emu/epoch", {"changes": [{"client_id": NORTH, "table": "courses",
            "schema": {"version": 2, "schema": sch},
            "upsert": [{"key": {"id": 42}, "value": dict(v1, grading_scheme="A-F")}]}]})
        s = self.dap("GET", "/dap/query/canvas/table/courses/schema").json()
        self.assertEqual(s["version"], 2)
        job, files = self.run_query("courses", {"format": "tsv"})
        self.assertEqual(job["schema_version"], 2)
        header = files[0].decode().split("\n", 1)[0].split("\t")
        self.assertNotIn("value.syllabus_body", header)
        self.assertIn("value.grading_scheme", header)
        rows = {r["key"]["id"]: r["value"] for r in self.state("courses")["rows"]}
        self.assertEqual(rows[42]["grading_scheme"], "A-F")
        self.assertEqual(rows[42]["storage_quota"], v1.get("storage_quota"))  # upsert cleared oversized
        self.assertIsNone(rows[cid0]["grading_scheme"])
        self.assertNotIn("syllabus_body", rows[cid0])
        # invalid epochs are rejected atomically
        r = self.req("POST", "/_emu/epoch", {"changes": [{"client_id": NORTH, "table": "nope", "upsert": []}]})
        self.assertEqual(r.status, 400)
        r = self.req("POST", "/_emu/epoch", {"changes": [{"client_id": NORTH, "table": "courses",
                                                          "oversized": [{"key": {"id": 999}, "column": "name"}]}]})
        self.assertEqual(r.status, 400)

    def test_rate_limits(self):
        self.ctl("POST", "/_emu/config", {"rate_limits": {"list_tables": 2, "create_job": 1}})
        self.ctl("DELETE", "/_emu/requests")
        codes = [self.dap("GET", "/dap/query/canvas/table").status for _ in range(3)]
        self.assertEqual(codes, [200, 200, 429])
        r = self.dap("GET", "/dap/query/canvas/table")
        self.assertEqual(r.json()["error"]["type"], "TooManyRequests")
        self.assertGreaterEqual(int(r.headers["Retry-After"]), 1)
        self.assertEqual(self.dap("GET", "/dap/query/canvas/table", cid=SOUTH).status, 200)  # per credential
        self.assertEqual(self.start_job("users", {"format": "jsonl"}).status, 200)
        self.assertEqual(self.start_job("users", {"format": "jsonl"}).status, 429)
        self.ctl("POST", "/_emu/config", {"retry_after": False})
        self.assertIsNone(self.dap("GET", "/dap/query/canvas/table").headers.get("Retry-After"))
        # (a request is logged once its response is sent: the last may not be yet)
        deadline = time.time() + 5
        while True:
            log = self.ctl("GET", "/_emu/requests")
            limited = [e for e in log if e["rate_limited"]]
            if len(limited) >= 4 or time.time() > deadline:
                break
            time.sleep(0.02)
        self.assertEqual(len(limited), 4)
        self.assertTrue(all(e["status"] == 429 for e in limited))
        stats = self.ctl("GET", "/_emu/stats")
        self.assertEqual(stats["rate_limited"], 4)
        self.assertEqual(stats["endpoint_statuses"]["list_tables"]["429"], 3)
        self.assertIn("headers", log[0])
        self.assertEqual(log[-1]["endpoint"], "list_tables")
        self.ctl("DELETE", "/_emu/stats")
        self.assertEqual(self.ctl("GET", "/_emu/stats")["total"], 0)
        self.ctl("DELETE", "/_emu/requests")
        self.assertEqual(self.ctl("GET", "/_emu/requests"), [])

    # -- faults ----------------------------------------------------------------------------------
    def faults(self, *rules):
        self.ctl("POST", "/_emu/faults", {"faults": list(rules)})

    def test_fault_status_and_listing(self):
        self.faults({"endpoint": "list_tables", "kind": "status", "status": 503, "times": 2, "retry_after": 3},
                    {"endpoint": "schema", "table": "users", "kind": "status", "status": 404,
                     "error_type": "NotFound", "message": "gone"})
        self.assertEqual(len(self.ctl("GET", "/_emu/faults")["faults"]), 2)
        r = self.dap("GET", "/dap/query/canvas/table")
        self.assertEqual(r.status, 503)
        self.assertEqual(r.headers["Retry-After"], "3")
        self.assertEqual(r.json()["error"]["type"], "ServiceUnavailable")
        self.assertEqual(self.dap("GET", "/dap/query/canvas/table").status, 503)
        self.assertEqual(self.dap("GET", "/dap/query/canvas/table").status, 200)
        self.assertEqual(self.dap("GET", "/dap/query/canvas/table/courses/schema").status, 200)  # table filter
        r = self.dap("GET", "/dap/query/canvas/table/users/schema")
        self.assertEqual((r.status, r.json()["error"]["message"]), (404, "gone"))
        self.assertEqual(self.ctl("GET", "/_emu/faults")["faults"], [])
        self.faults({"endpoint": "login", "kind": "status", "status": 500, "times": -1, "client_id": SOUTH})
        self.assertEqual(self.login(SOUTH, SOUTH_SECRET).status, 500)
        self.assertEqual(self.login(SOUTH, SOUTH_SECRET).status, 500)
        self.assertEqual(self.login().status, 200)
        self.ctl("DELETE", "/_emu/faults")
        self.assertEqual(self.login(SOUTH, SOUTH_SECRET).status, 200)
        for bad in ({"kind": "nope"}, {"kind": "corrupt_gzip", "endpoint": "login"}, {"kind": "status"},
                    {"kind": "bad_value", "table": "users"}, {"kind": "reset", "times": 0}, {"kind": "reset", "x": 1}):
            self.assertEqual(self.req("POST", "/_emu/faults", {"faults": [bad]}).status, 400, bad)
        log = self.ctl("GET", "/_emu/requests")
        self.assertTrue(any(e.get("fault") == "status" for e in log))

    def test_fault_reset_and_hang(self):
        tok = self.token()
        self.faults({"endpoint": "get_job", "kind": "reset"})
        with self.assertRaises((ConnectionError, http.client.HTTPException, urllib.error.URLError, OSError)):
            self.dap("GET", "/dap/job/x")
        self.assertEqual(self.dap("GET", "/dap/job/x").status, 404)
        self.faults({"endpoint": "list_tables", "kind": "hang", "seconds": 0.6})
        t0 = time.time()
        with self.assertRaises((TimeoutError, socket.timeout, urllib.error.URLError)):
            self.req("GET", "/dap/query/canvas/table", headers={"Authorization": "Bearer " + tok}, timeout=0.2)
        self.assertLess(time.time() - t0, 0.5)
        self.faults({"endpoint": "list_tables", "kind": "hang", "seconds": 0.2})
        t0 = time.time()
        self.assertEqual(self.dap("GET", "/dap/query/canvas/table").status, 200)
        self.assertGreaterEqual(time.time() - t0, 0.2)

    def test_fault_revoke_tokens(self):
        self.token()
        self.faults({"endpoint": "any", "kind": "revoke_tokens"})
        r = self.dap("GET", "/dap/query/canvas/table")
        self.assertEqual(r.status, 401)
        self.assertEqual(self.dap("GET", "/dap/query/canvas/table").status, 401)  # still revoked
        self._tokens.clear()
        self.assertEqual(self.dap("GET", "/dap/query/canvas/table").status, 200)

    def test_fault_download_kinds(self):
        job, files = self.run_query("enrollments", {"format": "jsonl"})
        url = self.urls(job)[job["objects"][0]["id"]]["url"]
        good = self.req("GET", url).body
        # corrupt_gzip
        self.faults({"endpoint": "download", "kind": "corrupt_gzip", "table": "enrollments"})
        r = self.req("GET", url)
        self.assertEqual((r.status, len(r.body)), (200, len(good)))
        self.assertNotEqual(r.body, good)
        with self.assertRaises((zlib.error, EOFError, OSError)):
            gunzip_all(r.body)
        # truncated_gzip
        self.faults({"endpoint": "download", "kind": "truncated_gzip"})
        r = self.req("GET", url)
        self.assertEqual(r.status, 200)
        self.assertEqual(r.body, good[: len(good) // 2])
        self.assertEqual(int(r.headers["Content-Length"]), len(good) // 2)
        with self.assertRaises((zlib.error, EOFError)):
            gunzip_all(r.body)
        # reset_mid_body: urllib raises IncompleteRead
        self.faults({"endpoint": "download", "kind": "reset_mid_body"})
        with self.assertRaises((http.client.IncompleteRead, ConnectionError, urllib.error.URLError)):
            self.req("GET", url)
        # expire_url
        self.faults({"endpoint": "download", "kind": "expire_url"})
        r = self.req("GET", url)
        self.assertEqual(r.status, 403)
        self.assertIn(b"<Code>AccessDenied</Code>", r.body)
        # all consumed: the download works again
        self.assertEqual(self.req("GET", url).body, good)
        # status fault on download
        self.faults({"endpoint": "download", "kind": "status", "status": 502})
        self.assertEqual(self.req("GET", url).status, 502)

    def test_fault_expire_job(self):
        job, _ = self.run_query("pseudonyms", {"format": "csv"})
        self.faults({"endpoint": "object_urls", "kind": "expire_job"})
        r = self.dap("POST", "/dap/object/url", job["objects"])
        self.assertEqual(r.status, 404)
        self.assertEqual(r.json()["error"]["type"], "NotFound")
        self.assertEqual(self.dap("GET", f"/dap/job/{job['id']}").status, 404)
        self.assertEqual(self.dap("POST", "/dap/object/url", job["objects"]).status, 404)
        again = self.start_job("pseudonyms", {"format": "csv"}).json()
        self.assertNotEqual(again["id"], job["id"])

    def test_fault_job_failed(self):
        self.faults({"endpoint": "create_job", "kind": "job_failed", "table": "users", "message": "boom"})
        r = self.start_job("users", {"format": "jsonl"})
        job = self.wait_job(r.json())
        self.assertEqual(job["status"], "failed")
        self.assertEqual(job["error"]["type"], "ProcessingError")
        self.assertEqual(job["error"]["message"], "boom")
        self.assertIn("uuid", job["error"])
        self.assertNotIn("objects", job)
        # the retry gets a fresh, good job (failed jobs are not reused)
        job2, _ = self.run_query("users", {"format": "jsonl"})
        self.assertNotEqual(job2["id"], job["id"])

    def test_fault_snapshot_required_out_of_range(self):
        self.faults({"endpoint": "create_job", "kind": "snapshot_required"},
                    {"endpoint": "create_job", "kind": "out_of_range", "since": "2026-10-01T00:00:00Z"})
        self.assertEqual(self.start_job("users", {"format": "jsonl"}).status, 200)  # snapshots unaffected
        r = self.start_job("users", {"format": "jsonl", "since": "2026-11-01T00:00:00Z"})
        self.assertEqual((r.status, r.json()["error"]["type"]), (400, "SnapshotRequired"))
        self.assertIn("since", r.json()["error"])
        r = self.start_job("users", {"format": "jsonl", "since": "2026-11-01T00:00:00Z"})
        self.assertEqual((r.status, r.json()["error"]["type"]), (400, "OutOfRange"))
        self.assertEqual(r.json()["error"]["since"], "2026-10-01T00:00:00Z")

    def test_fault_malformed_record(self):
        for fmt in ("jsonl", "csv", "tsv"):
            with self.subTest(fmt=fmt):
                self.faults({"endpoint": "create_job", "kind": "malformed_record", "table": "accounts"})
                job, files = self.run_query("accounts", {"format": fmt})
                last = files[0].splitlines()[-1].decode()
                if fmt == "jsonl":
                    self.assertEqual(last.strip(), '{"key": {"id":')
                    with self.assertRaises(ValueError):
                        json.loads(last)
                else:
                    header = files[0].splitlines()[0].decode()
                    sep = "," if fmt == "csv" else "\t"
                    self.assertNotEqual(len(last.split(sep)), len(header.split(sep)))
                # the next identical query is clean
                _job2, files2 = self.run_query("accounts", {"format": fmt})
                self.records(fmt, files2)

    def test_fault_malformed_record_control_quote(self):
        self.faults({"endpoint": "create_job", "kind": "malformed_record", "shape": "control_quote",
                     "table": "accounts"})
        _job, files = self.run_query("accounts", {"format": "jsonl"})
        before, after = files[0].split(b"\x02", 1)
        self.assertTrue(before.endswith(b'"name": "'))
        self.assertEqual(after, (b"y" * 99 + b"\n") * 50)

    def test_fault_malformed_record_end_marker(self):
        self.faults({"endpoint": "create_job", "kind": "malformed_record", "shape": "end_marker",
                     "table": "accounts"})
        _job, files = self.run_query("accounts", {"format": "tsv"})
        lines = files[0].splitlines(keepends=True)
        self.assertEqual(lines[1], b"\\.\n")
        self.assertGreater(len(lines), 2)

    def test_fault_malformed_record_extra_field(self):
        for fmt in ("csv", "tsv"):
            with self.subTest(fmt=fmt):
                self.faults({"endpoint": "create_job", "kind": "malformed_record", "shape": "extra_field",
                             "table": "accounts"})
                _job, files = self.run_query("accounts", {"format": fmt})
                lines = files[0].splitlines()
                sep = b"," if fmt == "csv" else b"\t"
                self.assertEqual(lines[-1], lines[-2] + sep + b"extra")
        self.assertEqual(self.req("POST", "/_emu/faults", {"faults": [{"endpoint": "create_job", "kind": "bad_value",
                                                                "table": "accounts", "column": "x",
                                                                "shape": "extra_field"}]}).status, 400)

    def test_fault_bad_value(self):
        self.faults({"endpoint": "create_job", "kind": "bad_value", "table": "submissions", "column": "score"})
        for fmt in ("csv", "jsonl"):
            _job, files = self.run_query("submissions", {"format": fmt})
            scores = [r["value"].get("score") for r in self.records(fmt, files)]
            if fmt == "csv":
                self.assertEqual(scores.count("not-a-number"), 1)
                self.faults({"endpoint": "create_job", "kind": "bad_value", "table": "submissions",
                             "column": "score"})
            else:
                self.assertEqual(scores[0], "not-a-number")

    # -- transport -------------------------------------------------------------------------------
    def test_keepalive_and_concurrency(self):
        tok = self.token()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        for i in range(5):  # one connection, several requests (mix of errors and successes)
            path = "/dap/query/canvas/table" if i % 2 == 0 else "/dap/job/nope"
            conn.request("GET", path, headers={"Authorization": "Bearer " + tok})
            r = conn.getresponse()
            r.read()
            self.assertIn(r.status, (200, 404))
        body = json.dumps({"format": "jsonl"})
        conn.request("POST", "/dap/query/canvas/table/users/data", body=body,
                     headers={"Authorization": "Bearer " + tok, "Content-Type": "application/json"})
        r = conn.getresponse()
        self.assertEqual(r.status, 200)
        r.read()
        # a 401 before the body is used must still consume the body
        conn.request("POST", "/dap/query/canvas/table/users/data", body=body * 100,
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        self.assertEqual(r.status, 401)
        conn.request("GET", "/_emu/health")
        self.assertEqual(json.loads(conn.getresponse().read())["ok"], True)
        conn.close()
        errors = []

        def worker():
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                for _ in range(5):
                    c.request("GET", "/dap/query/canvas/table/users/schema",
                              headers={"Authorization": "Bearer " + tok})
                    resp = c.getresponse()
                    resp.read()
                    if resp.status != 200:
                        errors.append(resp.status)
                c.close()
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

        threads = [threading.Thread(target=worker) for _ in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])

    def test_cli_and_tls(self):
        tmp = tempfile.mkdtemp()
        try:
            port_file = os.path.join(tmp, "port")
            args = [sys.executable, os.path.join(HERE, "cd2emu.py"), "--port", "0", "--port-file", port_file,
                    "--generate", "demo", "--quiet"]
            have_tls = shutil.which("openssl") is not None
            if have_tls:
                cert, key = os.path.join(tmp, "c.pem"), os.path.join(tmp, "k.pem")
                subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                                "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
                                "-addext", "subjectAltName=IP:127.0.0.1"],
                               check=True, capture_output=True)
                args += ["--tls-cert", cert, "--tls-key", key]
            p = subprocess.Popen(args, stderr=subprocess.PIPE)
            try:
                deadline = time.time() + 10
                while not os.path.exists(port_file):
                    self.assertLess(time.time(), deadline)
                    self.assertIsNone(p.poll())
                    time.sleep(0.05)
                with open(port_file) as f:
                    port = int(f.read())
                scheme = "https" if have_tls else "http"
                ctx = ssl.create_default_context(cafile=cert) if have_tls else None
                basic = base64.b64encode(f"{NORTH}:{NORTH_SECRET}".encode()).decode()
                req = urllib.request.Request(f"{scheme}://127.0.0.1:{port}/ids/auth/login",
                                             data=b"grant_type=client_credentials", method="POST",
                                             headers={"Authorization": "Basic " + basic})
                with urllib.request.urlopen(req, timeout=5, context=ctx) as f:
                    tok = json.loads(f.read())["access_token"]
                req = urllib.request.Request(f"{scheme}://127.0.0.1:{port}/dap/query/canvas/table/users/data",
                                             data=b'{"format":"tsv"}', method="POST",
                                             headers={"Authorization": "Bearer " + tok})
                with urllib.request.urlopen(req, timeout=5, context=ctx) as f:
                    job = json.loads(f.read())
                req = urllib.request.Request(f"{scheme}://127.0.0.1:{port}/dap/object/url",
                                             data=json.dumps(job.get("objects", [])).encode(), method="POST",
                                             headers={"Authorization": "Bearer " + tok})
                if job["status"] == "complete":
                    with urllib.request.urlopen(req, timeout=5, context=ctx) as f:
                        urls = json.loads(f.read())["urls"]
                    for u in urls.values():
                        self.assertTrue(u["url"].startswith(f"{scheme}://127.0.0.1:{port}/_obj/"))
                        with urllib.request.urlopen(u["url"], timeout=5, context=ctx) as f:
                            gunzip_all(f.read())
                p.send_signal(signal.SIGTERM)
                self.assertEqual(p.wait(timeout=5), 0)
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()
                p.stderr.close()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def test_bulk_tables(self):
        tmp = tempfile.mkdtemp()
        try:
            def part(name, lines, members=1):
                path = os.path.join(tmp, name)
                raw = "".join(lines).encode()
                with open(path, "wb") as f:  # several members, like real exports
                    for i in range(members):
                        f.write(gzip.compress(raw[len(raw) * i // members: len(raw) * (i + 1) // members]))
                return path
            head = "meta.ts\tkey.id\tvalue.name\n"
            big = ["2026-01-01T00:00:00Z\t%d\tname %d \\t ü\n" % (i, i) for i in range(1, 60001)]
            snap = [part("s0.tsv.gz", [head] + big[:30000], members=3), part("s1.tsv.gz", [head] + big[30000:])]
            # an incompressible tail makes a file longer than one streaming chunk
            with open(snap[1], "ab") as f:
                f.write(gzip.compress(os.urandom(3 << 20), compresslevel=0))
            ihead = "meta.ts\tmeta.action\tkey.id\tvalue.name\n"
            inc = [part("i0.tsv.gz", [ihead, "2026-01-01T12:00:00Z\tU\t1\tnew\n",
                                      "2026-01-01T12:00:00Z\tD\t2\t\\N\n"])]
            schema = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "properties": {
                "key": {"type": "object", "properties": {"id": {"type": "integer", "format": "int64"}}},
                "value": {"type": "object", "properties": {"name": {"type": "string"}}},
                "meta": {"type": "object", "properties": {"ts": {"type": "string", "format": "date-time"}}}}}
            body = {"client_id": NORTH, "table": "bigtable", "version": 3, "schema": schema, "format": "tsv",
                    "snapshot": {"at": "2026-01-01T00:00:00Z", "files": snap},
                    "incrementals": [{"since": "2026-01-01T00:00:00Z", "until": "2026-01-02T00:00:00Z",
                                      "files": inc}]}
            # validation: nothing registered on a bad body
            for bad in ({"format": "parquet"}, {"snapshot": {"at": "x", "files": snap}},
                        {"snapshot": {"at": "2026-01-01T00:00:00Z", "files": ["relative.gz"]}},
                        {"snapshot": {"at": "2026-01-01T00:00:00Z", "files": [tmp + "/missing.gz"]}},
                        {"client_id": "us-east-1#nobody"}, {"extra": 1},
                        {"incrementals": [{"since": "2025-01-01T00:00:00Z", "until": "2026-01-02T00:00:00Z",
                                           "files": inc}]}):
                r = self.req("POST", "/_emu/bulk", dict(body, **bad))
                self.assertEqual(r.status, 400, bad)
                self.assertEqual(r.json()["error"]["type"], "ValidationError")
            self.assertEqual(self.ctl("GET", "/_emu/bulk"), [])
            reg = self.ctl("POST", "/_emu/bulk", body)
            self.assertEqual((reg["table"], reg["files"], reg["at"]), ("bigtable", 2, "2026-01-01T00:00:00Z"))
            self.assertEqual(len(self.ctl("GET", "/_emu/bulk")), 1)
            # listed beside the in-memory tables, with its schema
            self.assertIn("bigtable", self.dap("GET", "/dap/query/canvas/table").json()["tables"])
            self.assertIn("users", self.dap("GET", "/dap/query/canvas/table").json()["tables"])
            self.assertEqual(self.dap("GET", "/dap/query/canvas/table/bigtable/schema").json(),
                             {"version": 3, "schema": schema})
            self.assertEqual(self.req("GET", f"/_emu/state?client_id={urllib.parse.quote(NORTH)}&table=bigtable").status, 400)
            self.assertEqual(self.req("POST", "/_emu/epoch", {"changes": [
                {"client_id": NORTH, "table": "bigtable", "delete": [{"key": {"id": 1}}]}]}).status, 400)
            # another format than the files'
            r = self.start_job("bigtable", {"format": "jsonl"})
            self.assertEqual(r.status, 400)
            self.assertEqual(r.json()["error"]["type"], "ValidationError")
            # snapshot: the files as they are, through waiting -> running -> complete
            self.ctl("POST", "/_emu/config", {"job_latency": 0.4})
            r = self.start_job("bigtable", {"format": "tsv", "mode": "condensed"})
            self.assertEqual(r.json()["status"], "waiting")
            time.sleep(0.25)
            self.assertEqual(self.dap("GET", f"/dap/job/{r.json()['id']}").json()["status"], "running")
            job = self.wait_job(r.json())
            self.assertEqual((job["at"], job["schema_version"], len(job["objects"])), ("2026-01-01T00:00:00Z", 3, 2))
            files = self.download_all(job)
            with open(snap[1], "rb") as f:
                raw1 = f.read()
            self.assertGreater(len(raw1), cd2emu.Handler.STREAM_CHUNK)
            self.assertEqual(len(self.records("tsv", [files[0]])), 30000)
            self.assertTrue(gunzip_all(raw1).startswith(files[1][:100]))
            # Range on a streamed file
            url = self.urls(job)[job["objects"][1]["id"]]["url"]
            r = self.req("GET", url, headers={"Range": "bytes=1000-"})
            self.assertEqual(r.status, 206)
            self.assertEqual(r.body, raw1[1000:])
            self.assertEqual(r.headers["Content-Range"], f"bytes 1000-{len(raw1) - 1}/{len(raw1)}")
            self.assertEqual(self.req("GET", url, headers={"Range": f"bytes={len(raw1)}-"}).status, 416)
            r = self.req("HEAD", url)
            self.assertEqual((r.status, int(r.headers["Content-Length"]), r.body), (200, len(raw1), b""))
            # download faults apply to streamed files too
            self.ctl("POST", "/_emu/faults", [{"endpoint": "download", "kind": "truncated_gzip"}])
            self.assertEqual(self.req("GET", url).body, raw1[: len(raw1) // 2])
            self.ctl("POST", "/_emu/faults", [{"endpoint": "download", "kind": "corrupt_gzip"}])
            got = self.req("GET", url).body
            self.assertEqual(len(got), len(raw1))
            self.assertEqual(sum(a != b for a, b in zip(got, raw1)), 16)
            # incremental whose since is the registered one
            self.ctl("POST", "/_emu/config", {"job_latency": 0})
            job, files = self.run_query("bigtable", {"format": "tsv", "since": "2026-01-01T00:00:00Z"})
            self.assertEqual((job["since"], job["until"]), ("2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"))
            self.assertEqual([r["meta"]["action"] for r in self.records("tsv", files)], ["U", "D"])
            # nothing new after the last until
            job, files = self.run_query("bigtable", {"format": "tsv", "since": "2026-01-02T00:00:00Z"})
            self.assertEqual((job["since"], job["until"], job["objects"]),
                             ("2026-01-02T00:00:00Z", "2026-01-02T00:00:00Z", []))
            job, files = self.run_query("bigtable", {"format": "tsv", "since": "2026-01-03T00:00:00Z"})
            self.assertEqual((job["until"], job["objects"]), ("2026-01-03T00:00:00Z", []))
            # a since no file set starts at
            self.assertEqual(self.start_job("bigtable", {"format": "tsv", "since": "2026-01-01T06:00:00Z"}).status, 400)
            # replacing the table: new files, no reuse of the old (deduplicated) jobs
            self.ctl("POST", "/_emu/bulk", dict(body, snapshot={"at": "2026-01-05T00:00:00Z", "files": snap[:1]},
                                                incrementals=[]))
            job, files = self.run_query("bigtable", {"format": "tsv"})
            self.assertEqual((job["at"], len(files)), ("2026-01-05T00:00:00Z", 1))
            # a new credential, created with its secret
            self.ctl("POST", "/_emu/bulk", dict(body, client_id="us-east-1#bulk", secret="b"))
            tok = self.login("us-east-1#bulk", "b").json()["access_token"]
            r = self.req("POST", "/dap/query/canvas/table/bigtable/data", {"format": "tsv"},
                         {"Authorization": "Bearer " + tok})
            self.assertEqual((r.json()["status"], len(r.json()["objects"])), ("complete", 2))
            self.ctl("DELETE", "/_emu/bulk?client_id=" + urllib.parse.quote(NORTH) + "&table=bigtable")
            self.assertEqual(self.start_job("bigtable", {"format": "tsv"}).status, 404)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- namespaces ------------------------------------------------------------------------------
    def test_namespaces_listing_schema_data(self):
        listing = {ns: self.dap("GET", f"/dap/query/{ns}/table").json()["tables"] for ns in cd2emu.NAMESPACES}
        self.assertEqual(set(listing["canvas"]), CANVAS_TABLES)  # unchanged
        self.assertEqual(listing["canvas_logs"], ["web_logs"])
        self.assertEqual(listing["new_quizzes"], ["quiz_sessions", "quizzes"])
        self.assertEqual(listing["catalog"], ["enrollments", "products", "users"])
        self.assertIn("dap:query:catalog", self.login().json()["scope"])
        # an unknown namespace: 404 resource (after authentication)
        for method, path in (("GET", "/dap/query/nope/table"), ("GET", "/dap/query/nope/table/users/schema"),
                             ("POST", "/dap/query/nope/table/users/data")):
            r = self.dap(method, path, {"format": "jsonl"} if method == "POST" else None)
            self.assertEqual(r.status, 404, path)
            self.assertEqual((r.json()["error"]["type"], r.json()["error"]["kind"]), ("NotFound", "resource"))
            self.assertEqual(self.req(method, path).status, 401)
        # a table is found only in its namespace
        self.assertEqual(self.dap("GET", "/dap/query/canvas/table/web_logs/schema").status, 404)
        self.assertEqual(self.dap("GET", "/dap/query/canvas/table/catalog.users/schema").status, 404)
        self.assertEqual(self.dap("GET", "/dap/query/catalog/table/courses/schema").status, 404)
        self.assertEqual(self.start_job("quizzes", {"format": "jsonl"}).status, 404)
        # schema and data of a table of each namespace
        for ns, table in (("canvas", "courses"), ("canvas_logs", "web_logs"), ("new_quizzes", "quiz_sessions"),
                          ("catalog", "products")):
            with self.subTest(ns=ns):
                qname = table if ns == "canvas" else f"{ns}.{table}"
                sch = self.dap("GET", f"/dap/query/{ns}/table/{table}/schema").json()
                self.assertEqual(sch, {"version": 1, "schema": DEMO["instances"][NORTH]["tables"][qname]["schema"]})
                self.assertIn("required", sch["schema"]["properties"]["value"])
                expected = self.state(qname, window=True)
                for fmt in ("jsonl", "tsv"):
                    job, files = self.run_query(table, {"format": fmt}, ns=ns)
                    self.assertEqual(job["at"], "2026-11-01T00:00:00Z")
                    recs = self.records(fmt, files)
                    self.assertEqual(sorted(str(r["key"]["id"]) for r in recs),
                                     sorted(str(r["key"]["id"]) for r in expected["rows"]))
                    job2, _ = self.run_query(table, {"format": fmt, "since": "2026-11-01T00:00:00Z"}, ns=ns)
                    self.assertEqual(job2["until"], "2026-11-01T00:00:00Z")
        wl = self.dap("GET", "/dap/query/canvas_logs/table/web_logs/schema").json()["schema"]["properties"]
        self.assertEqual(wl["key"]["properties"]["id"]["format"], "uuid")
        self.assertEqual(wl["value"]["properties"]["http_method"]["enum"], cd2emu.HTTP_METHODS)
        for col in ("timestamp", "user_id", "real_user_id", "course_id", "url", "user_agent", "session_id",
                    "request_id", "interaction_micros", "participated"):
            self.assertIn(col, wl["value"]["properties"])
        # csv of web_logs: user agents with commas and quotes survive
        _job, files = self.run_query("web_logs", {"format": "csv"}, ns="canvas_logs")
        agents = {r["value"]["user_agent"] for r in self.records("csv", files)}
        self.assertTrue(any(a and '"' in a and "," in a for a in agents))
        # load-time validation of qualified names
        for bad in ({"users": {"schema": {"properties": {}}}, "canvas.users": {"schema": {"properties": {}}}},
                    {"nope.users": {"schema": {"properties": {}}}}, {"canvas.a.b": {"schema": {"properties": {}}}}):
            r = self.req("POST", "/_emu/load", {"instances": {"us-east-1#x": {"secret": "s", "tables": bad}}})
            self.assertEqual(r.status, 400, bad)
        self.ctl("POST", "/_emu/load", {"instances": {"us-east-1#x": {"secret": "s", "tables": {
            "canvas.users": {"schema": {"properties": {}}}, "catalog.users": {"schema": {"properties": {}}}}}}})
        tok = self.login("us-east-1#x", "s").json()["access_token"]
        for ns in ("canvas", "catalog"):
            r = self.req("GET", f"/dap/query/{ns}/table", headers={"Authorization": "Bearer " + tok})
            self.assertEqual(r.json()["tables"], ["users"])
        r = self.req("GET", "/dap/query/new_quizzes/table", headers={"Authorization": "Bearer " + tok})
        self.assertEqual(r.json()["tables"], [])

    def test_namespace_tables_independent(self):
        canvas_before = self.state("enrollments")
        cat_before = self.state("catalog.enrollments")
        self.assertNotEqual(self.dap("GET", "/dap/query/canvas/table/enrollments/schema").json(),
                            self.dap("GET", "/dap/query/catalog/table/enrollments/schema").json())
        # the demo's catalog enrollments share keys with the canvas ones, with other values
        shared = {r["key"]["id"] for r in canvas_before["rows"]} & {r["key"]["id"] for r in cat_before["rows"]}
        self.assertGreater(len(shared), 5)
        k = min(shared)
        cat_row = next(r for r in cat_before["rows"] if r["key"]["id"] == k)
        ep = self.ctl("POST", "/_emu/epoch", {"changes": [
            {"client_id": NORTH, "table": "catalog.enrollments",
             "upsert": [{"key": {"id": k}, "value": dict(cat_row["value"], status="completed")}]},
            {"client_id": NORTH, "table": "enrollments", "namespace": "catalog", "delete": [{"key": {"id": k + 1}}]},
            {"client_id": NORTH, "table": "new_quizzes.quiz_events", "schema": {
                "version": 1, "schema": DEMO["instances"][NORTH]["tables"]["catalog.users"]["schema"]},
             "upsert": [{"key": {"id": 1}, "value": {"email": "x@example.invalid"}}]}]})
        self.assertEqual(self.state("enrollments"), dict(canvas_before, at=ep["at"]))  # untouched
        after = {r["key"]["id"]: r["value"] for r in self.state("catalog.enrollments")["rows"]}
        self.assertEqual(after[k]["status"], "completed")
        self.assertNotIn(k + 1, after)
        # the changes show up in an incremental of that namespace only
        job, files = self.run_query("enrollments", {"format": "jsonl", "since": "2026-11-01T00:00:00Z"}, ns="catalog")
        self.assertEqual(job["until"], ep["at"])
        self.assertEqual(sorted((r["key"]["id"], r["meta"]["action"]) for r in self.records("jsonl", files)),
                         [(k, "U"), (k + 1, "D")])
        _job, files = self.run_query("enrollments", {"format": "jsonl", "since": "2026-11-01T00:00:00Z"})
        self.assertEqual(self.records("jsonl", files), [])
        # an epoch can create a table in a namespace
        self.assertEqual(self.dap("GET", "/dap/query/new_quizzes/table").json()["tables"],
                         ["quiz_events", "quiz_sessions", "quizzes"])
        self.assertNotIn("quiz_events", self.dap("GET", "/dap/query/canvas/table").json()["tables"])
        # the whole-instance state names tables by qualified name, optionally of one namespace
        allst = self.ctl("GET", f"/_emu/state?client_id={urllib.parse.quote(NORTH)}")["tables"]
        self.assertTrue(CANVAS_TABLES | set(OTHER_TABLES) <= set(allst))
        cat = self.ctl("GET", f"/_emu/state?client_id={urllib.parse.quote(NORTH)}&namespace=catalog")["tables"]
        self.assertEqual(set(cat), {"catalog.enrollments", "catalog.products", "catalog.users"})
        self.assertEqual(self.state("enrollments&namespace=catalog")["rows"], self.state("catalog.enrollments")["rows"])
        for bad in ("nope.users", "canvas_logs.nope"):
            self.assertEqual(self.req("GET", f"/_emu/state?client_id={urllib.parse.quote(NORTH)}&table={bad}").status, 400)
        self.assertEqual(self.req("POST", "/_emu/epoch", {"changes": [
            {"client_id": NORTH, "table": "catalog.enrollments", "namespace": "canvas"}]}).status, 400)
        # jobs of both namespaces, filtered by the control API
        jobs = self.ctl("GET", "/_emu/jobs?table=catalog.enrollments")
        self.assertTrue(jobs and all((j["namespace"], j["table"]) == ("catalog", "enrollments") for j in jobs))
        jobs = self.ctl("GET", "/_emu/jobs?table=enrollments")
        self.assertTrue(jobs and all((j["namespace"], j["table"]) == ("canvas", "enrollments") for j in jobs))
        # a bulk table in a namespace
        tmp = tempfile.mkdtemp()
        try:
            path = os.path.join(tmp, "s.tsv.gz")
            with open(path, "wb") as f:
                f.write(gzip.compress(b"meta.ts\tkey.id\n2026-01-01T00:00:00Z\t1\n"))
            body = {"client_id": NORTH, "table": "users", "namespace": "catalog", "schema": {"properties": {}},
                    "format": "tsv", "snapshot": {"at": "2026-01-01T00:00:00Z", "files": [path]}}
            reg = self.ctl("POST", "/_emu/bulk", body)
            self.assertEqual((reg["table"], reg["namespace"]), ("users", "catalog"))
            self.assertEqual(self.req("POST", "/_emu/bulk", dict(body, table="canvas.users")).status, 400)
            job, files = self.run_query("users", {"format": "tsv"}, ns="catalog")
            self.assertEqual(job["at"], "2026-01-01T00:00:00Z")
            self.assertEqual(self.run_query("users", {"format": "tsv"})[0]["at"], ep["at"])  # canvas: in memory
            self.ctl("DELETE", "/_emu/bulk?client_id=" + urllib.parse.quote(NORTH) + "&table=catalog.users")
            self.assertEqual(self.start_job("users", {"format": "tsv"}, ns="catalog").status, 404)
            self.assertEqual(self.start_job("users", {"format": "tsv"}).status, 200)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def test_namespace_faults_and_request_log(self):
        self.ctl("DELETE", "/_emu/requests")
        self.faults(*[{"endpoint": ep, "namespace": "catalog", "kind": "status", "status": 403, "times": -1}
                      for ep in ("list_tables", "schema", "create_job")],
                    {"endpoint": "any", "namespace": "new_quizzes", "kind": "status", "status": 404, "times": -1})
        for ns in ("catalog", "new_quizzes"):
            for method, path in (("GET", f"/dap/query/{ns}/table"), ("GET", f"/dap/query/{ns}/table/quizzes/schema"),
                                 ("POST", f"/dap/query/{ns}/table/products/data")):
                r = self.dap(method, path, {"format": "jsonl"} if method == "POST" else None)
                want = {"catalog": (403, "AccountNotOnboarded"), "new_quizzes": (404, "NotFound")}[ns]
                self.assertEqual((r.status, r.json()["error"]["type"]), want, path)
                self.assertIn("uuid", r.json()["error"])
        # the other namespaces work
        self.assertEqual(set(self.dap("GET", "/dap/query/canvas/table").json()["tables"]), CANVAS_TABLES)
        self.assertEqual(self.dap("GET", "/dap/query/canvas_logs/table").status, 200)
        job, _ = self.run_query("enrollments", {"format": "jsonl"})
        self.assertEqual(job["status"], "complete")
        self.ctl("DELETE", "/_emu/faults")
        # a qualified table in a rule means that namespace; a bare one matches that name in any namespace
        self.faults({"endpoint": "schema", "table": "catalog.enrollments", "kind": "status", "status": 500,
                     "times": -1})
        rules = self.ctl("GET", "/_emu/faults")["faults"]
        self.assertEqual((rules[0]["table"], rules[0]["namespace"]), ("enrollments", "catalog"))
        self.assertEqual(self.dap("GET", "/dap/query/catalog/table/enrollments/schema").status, 500)
        self.assertEqual(self.dap("GET", "/dap/query/canvas/table/enrollments/schema").status, 200)
        self.ctl("DELETE", "/_emu/faults")
        self.faults({"endpoint": "schema", "table": "enrollments", "kind": "status", "status": 502, "times": 2})
        self.assertEqual(self.dap("GET", "/dap/query/catalog/table/enrollments/schema").status, 502)
        self.assertEqual(self.dap("GET", "/dap/query/canvas/table/enrollments/schema").status, 502)
        for bad in ({"kind": "reset", "namespace": "nope"}, {"kind": "reset", "table": "nope.users"},
                    {"kind": "reset", "table": "catalog.users", "namespace": "canvas"}):
            self.assertEqual(self.req("POST", "/_emu/faults", {"faults": [bad]}).status, 400, bad)
        # download faults of a namespace's job
        self.faults({"endpoint": "download", "namespace": "catalog", "kind": "expire_url", "times": 1})
        r = self.start_job("enrollments", {"format": "jsonl"})
        urls = self.urls(r.json())
        self.assertEqual(self.req("GET", next(iter(urls.values()))["url"]).status, 200)  # canvas: untouched
        job = self.start_job("enrollments", {"format": "jsonl"}, ns="catalog").json()
        urls = self.urls(job)
        self.assertEqual(self.req("GET", urls[job["objects"][0]["id"]]["url"]).status, 403)
        self.assertEqual(self.dap("GET", f"/dap/job/{job['id']}").status, 200)
        log = self.ctl("GET", "/_emu/requests")
        self.assertTrue(all("namespace" in e for e in log))
        forbidden = [e for e in log if e["status"] == 403 and e["endpoint"] != "download"]
        self.assertTrue(forbidden and all(e["namespace"] == "catalog" and e.get("fault") == "status" for e in forbidden))
        self.assertTrue(any(e["endpoint"] == "list_tables" and e["namespace"] == "canvas_logs" for e in log))
        cat = [e for e in log if e["namespace"] == "catalog" and e["table"] == "enrollments"]
        self.assertEqual({e["endpoint"] for e in cat}, {"create_job", "object_urls", "download", "get_job", "schema"})
        self.assertTrue(all(e["namespace"] == "canvas" for e in log
                            if e["table"] == "enrollments" and e["endpoint"] in ("object_urls", "download", "create_job")
                            and e not in cat))
        self.assertTrue(all(e["namespace"] is None for e in log if e["endpoint"] == "login"))

    def test_web_logs_retention(self):
        start = cd2emu.parse_ts("2026-11-01T00:00:00Z")
        everything = self.state("canvas_logs.web_logs")
        window = self.state("canvas_logs.web_logs", window=True)
        self.assertEqual(len(everything["rows"]), len(DEMO["instances"][NORTH]["tables"]["canvas_logs.web_logs"]["rows"]))
        self.assertEqual(window["window_start"], "2026-10-02T00:00:00Z")
        self.assertNotIn("window_start", everything)
        inside = [r for r in everything["rows"]
                  if cd2emu.parse_ts(r["value"]["timestamp"]) >= start - cd2emu.timedelta(days=30)]
        self.assertEqual(window["rows"], inside)
        self.assertGreater(len(everything["rows"]) - len(inside), 20)  # some rows are older than 30 days
        self.assertEqual(self.state("users", window=True), self.state("users"))  # only canvas_logs has a window
        job, files = self.run_query("web_logs", {"format": "jsonl"}, ns="canvas_logs")
        self.assertEqual(sorted(r["key"]["id"] for r in self.records("jsonl", files)),
                         sorted(r["key"]["id"] for r in inside))
        # an incremental older than the window: OutOfRange with the earliest permitted since
        r = self.start_job("web_logs", {"format": "jsonl", "since": "2026-09-30T00:00:00Z"}, ns="canvas_logs")
        self.assertEqual(r.status, 400)
        self.assertEqual((r.json()["error"]["type"], r.json()["error"]["since"]), ("OutOfRange", "2026-10-02T00:00:00Z"))
        self.assertEqual(self.start_job("web_logs", {"format": "jsonl", "since": "2026-10-02T00:00:00Z"},
                                        ns="canvas_logs").status, 200)
        self.assertEqual(self.start_job("users", {"format": "jsonl", "since": "2026-09-30T00:00:00Z"}).status, 200)
        # the window follows the clock and the config; the store keeps every row
        for bad in (0, -1, "30", True, None, float("inf")):
            self.assertEqual(self.req("POST", "/_emu/config", {"log_retention_days": bad}).status, 400, bad)
        self.ctl("POST", "/_emu/config", {"log_retention_days": 0.5, "dedupe_jobs": False})
        new_id = "00000000-0000-4000-8000-000000000001"
        self.ctl("POST", "/_emu/epoch", {"at": "2026-11-02T00:00:00Z", "changes": [{
            "client_id": NORTH, "table": "canvas_logs.web_logs", "upsert": [{"key": {"id": new_id}, "value": {
                "timestamp": "2026-11-01T23:59:00Z", "url": "/", "http_method": "GET", "http_status": "200"}}]}]})
        r = self.start_job("web_logs", {"format": "jsonl", "since": "2026-11-01T00:00:00Z"}, ns="canvas_logs")
        self.assertEqual((r.json()["error"]["type"], r.json()["error"]["since"]), ("OutOfRange", "2026-11-01T12:00:00Z"))
        job, files = self.run_query("web_logs", {"format": "jsonl", "since": "2026-11-01T12:00:00Z"}, ns="canvas_logs")
        self.assertEqual([r["key"]["id"] for r in self.records("jsonl", files)], [new_id])
        _job, files = self.run_query("web_logs", {"format": "jsonl"}, ns="canvas_logs")
        self.assertEqual([r["key"]["id"] for r in self.records("jsonl", files)], [new_id])
        self.assertEqual([r["key"]["id"] for r in self.state("canvas_logs.web_logs", window=True)["rows"]], [new_id])
        self.assertEqual(len(self.state("canvas_logs.web_logs")["rows"]), len(everything["rows"]) + 1)
        # earliest_since still applies, with its own error type when it is the later bound
        self.ctl("POST", "/_emu/config", {"earliest_since": "2026-11-01T18:00:00Z"})
        r = self.start_job("web_logs", {"format": "jsonl", "since": "2026-11-01T12:00:00Z"}, ns="canvas_logs")
        self.assertEqual((r.json()["error"]["type"], r.json()["error"]["since"]), ("SnapshotRequired", "2026-11-01T18:00:00Z"))
        self.ctl("POST", "/_emu/config", {"earliest_since": None, "log_retention_days": 30})
        _job, files = self.run_query("web_logs", {"format": "jsonl"}, ns="canvas_logs")
        self.assertEqual(len(self.records("jsonl", files)), len(self.state("canvas_logs.web_logs", window=True)["rows"]))

    def test_demo_scenario(self):
        s = cd2emu.demo_scenario()
        self.assertEqual(s, DEMO)  # deterministic
        for cid in (NORTH, SOUTH):
            tables = s["instances"][cid]["tables"]
            self.assertEqual(set(tables), {"accounts", "users", "courses", "enrollments", "submissions",
                                           "pseudonyms"} | set(OTHER_TABLES))
            self.assertEqual(list(tables)[:6], list(cd2emu.DEMO_SCHEMAS))  # canvas first, as before
            for t in tables.values():
                self.assertGreaterEqual(len(t["rows"]), 5)
                self.assertLessEqual(len(t["rows"]), 500)
            logs = tables["canvas_logs.web_logs"]["rows"]
            self.assertGreaterEqual(len(logs), 250)
            user_ids = {r["key"]["id"] for r in tables["users"]["rows"]}
            self.assertTrue(any(r["value"].get("user_id") in user_ids for r in logs))
            self.assertTrue(any("user_id" not in r["value"] for r in logs))
            self.assertTrue(any("real_user_id" in r["value"] for r in logs))
            self.assertTrue(any("," in r["value"].get("user_agent", "") for r in logs))
            self.assertTrue(any('"' in r["value"].get("user_agent", "") for r in logs))
            self.assertEqual({r["value"]["http_method"] for r in logs}, set(cd2emu.HTTP_METHODS))
            quizzes = {r["key"]["id"] for r in tables["new_quizzes.quizzes"]["rows"]}
            for r in tables["new_quizzes.quiz_sessions"]["rows"]:
                self.assertIn(r["value"]["quiz_id"], quizzes)
                self.assertIn(r["value"]["user_id"], user_ids)
            cat_users = {r["key"]["id"] for r in tables["catalog.users"]["rows"]}
            products = {r["key"]["id"] for r in tables["catalog.products"]["rows"]}
            for r in tables["catalog.enrollments"]["rows"]:
                self.assertIn(r["value"]["user_id"], cat_users)
                self.assertIn(r["value"]["product_id"], products)
            for name in OTHER_TABLES:
                self.assertTrue(20 <= len(tables[name]["rows"]) <= 60 or name == "canvas_logs.web_logs"
                                or name.startswith("catalog.") and 10 <= len(tables[name]["rows"]) <= 40, name)
        sub = s["instances"][NORTH]["tables"]["submissions"]["schema"]["properties"]["value"]["properties"]
        for col in ("assignment_id", "user_id", "grader_id", "score", "workflow_state"):
            self.assertIn(col, sub)


if __name__ == "__main__":
    unittest.main(verbosity=2)
