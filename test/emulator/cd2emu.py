#!/usr/bin/env python3
"""cd2emu - a local emulator of Instructure's Canvas Data 2 "DAP Query API".

It follows /work/shared/docs/cd2-api.md (the protocol notes of the cd2sync project), not any
particular client. Python 3.11 standard library only. See README.md next to this file for the
CLI, the control API (/_emu/...), the configuration keys and the fault kinds.

Layout (one class per concern):
  * time / schema helpers
  * Store        - instances, tables, per-key change log, the data clock, epochs, expected state
  * BulkTable    - tables served from files on disk (benchmarks: millions of rows)
  * FileEncoder  - records -> jsonl / csv / tsv text -> (multi-member) gzip files
  * Job, Jobs    - query jobs, deduplication, objects
  * Tokens       - login, JWT bearer tokens, revocation
  * RateLimiter  - sliding one-minute windows per credential and endpoint
  * FaultRules   - injected faults
  * Emulator     - glues the above together (one lock for all state)
  * Handler      - the HTTP handler (routing, DAP endpoints, downloads, control endpoints)
  * demo_scenario() and main()
"""
from __future__ import annotations

import argparse
import base64
import collections
import copy
import gzip
import hashlib
import hmac
import json
import math
import os
import random
import signal
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
import traceback
import uuid
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote

UTC = timezone.utc
PLACEHOLDER = "__cd2_oversized_truncated__"
DEFAULT_START = "2026-11-01T00:00:00Z"
ALL_FORMATS = ("jsonl", "csv", "tsv", "parquet")
SUPPORTED_FORMATS = ("jsonl", "csv", "tsv")  # parquet is recognised but never produced
ENDPOINTS = ("login", "list_tables", "schema", "create_job", "get_job", "object_urls", "download")
RATE_LIMITED_ENDPOINTS = ("create_job", "get_job", "list_tables", "schema", "object_urls")
MAX_BODY = 256 * 1024 * 1024
MAX_LOG = 100_000
NAMESPACES = ("canvas", "canvas_logs", "new_quizzes", "catalog")
DEFAULT_NS = "canvas"        # a bare table name (scenario, control API) is a table of this namespace
LOG_NS = "canvas_logs"       # its tables keep only the last log_retention_days days

DEFAULT_CONFIG = {
    "job_latency": 0.3,          # seconds from creation until a job is terminal (0 = at once)
    "job_lifetime": 86400,       # seconds a job and its files live
    "token_lifetime": 3600,      # seconds an access token lives (expires_in)
    "url_lifetime": 900,         # seconds a presigned object URL lives
    "dedupe_jobs": True,         # identical queries return the same job until it expires
    "parts": 2,                  # max number of data files per job
    "empty_parts": 1,            # number of extra files with no records per job
    "multi_member": True,        # each gzip file is several concatenated gzip members
    "null_style": "omit",        # jsonl: "omit" NULL properties or write them as "null"
    "shuffle": False,            # random member / property / column order
    "since_inclusive": False,    # incremental window lower bound inclusive?
    "until_inclusive": True,     # incremental window upper bound inclusive?
    "earliest_since": None,      # ISO time; an older since -> since_too_old_error
    "since_too_old_error": "SnapshotRequired",  # or "OutOfRange"
    "formats": ["jsonl", "csv", "tsv"],
    "rate_limits": {},           # endpoint -> requests per credential per sliding minute
    "retry_after": True,         # send Retry-After with 429 replies
    "csv_newline": "\r\n",       # record separator in csv files (RFC 4180: CRLF)
    "object_base_url": None,     # base of presigned URLs; default http(s)://127.0.0.1:PORT
    "seed": 0,                   # seed of the shuffle random generator
    "log_retention_days": 30,    # canvas_logs: days of rows a snapshot holds / an incremental reaches
}


# ----------------------------------------------------------------------------------------------
# time helpers
# ----------------------------------------------------------------------------------------------

def parse_ts(value) -> datetime:
    """Parse an ISO 8601 timestamp ('Z' or an offset; naive means UTC) into an aware UTC datetime."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("timestamp must be a non-empty ISO 8601 string")
    s = value.strip()
    if s[-1] in "zZ":
        s = s[:-1] + "+00:00"
    dt = datetime.fromisoformat(s)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def fmt_ts(dt: datetime) -> str:
    """ISO 8601 with 'Z'; fractional seconds only when present (trailing zeros trimmed)."""
    dt = dt.astimezone(UTC)
    s = dt.strftime("%Y-%m-%dT%H:%M:%S")
    if dt.microsecond:
        s += (".%06d" % dt.microsecond).rstrip("0")
    return s + "Z"


def wall_iso(t: float) -> str:
    return fmt_ts(datetime.fromtimestamp(t, UTC).replace(microsecond=0))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def log(msg: str):
    """Write a line to stderr; never fail (stderr may be a closed pipe)."""
    try:
        sys.stderr.write(msg + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def compact_json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


# ----------------------------------------------------------------------------------------------
# schema helpers
# ----------------------------------------------------------------------------------------------

def _part_props(schema: dict, part: str) -> dict:
    p = (schema or {}).get("properties", {}).get(part, {})
    props = p.get("properties", {}) if isinstance(p, dict) else {}
    return props if isinstance(props, dict) else {}


def key_columns(schema: dict) -> list:
    return list(_part_props(schema, "key")) or ["id"]


def value_columns(schema: dict) -> list:
    return list(_part_props(schema, "value"))


def column_def(schema: dict, col: str) -> dict:
    return _part_props(schema, "value").get(col) or _part_props(schema, "key").get(col) or {}


def column_types(defn: dict) -> list:
    """The non-null JSON Schema types of a property (follows oneOf/anyOf)."""
    t = defn.get("type")
    if isinstance(t, str):
        return [] if t == "null" else [t]
    if isinstance(t, list):
        return [x for x in t if x != "null"]
    out = []
    for alt in defn.get("oneOf", []) + defn.get("anyOf", []):
        if isinstance(alt, dict):
            out += column_types(alt)
    return out


def is_string_column(defn: dict) -> bool:
    ts = column_types(defn)
    return bool(ts) and all(t == "string" for t in ts)


def bad_value_for(defn: dict) -> str:
    """A string that does not fit the column's type (used by the bad_value fault).

    For a plain text column every string fits; we still use "not-a-number" there (documented)."""
    types = column_types(defn)
    fmt = defn.get("format")
    if "integer" in types or "number" in types:
        return "not-a-number"
    if "boolean" in types:
        return "not-a-boolean"
    if "object" in types:
        return "{not valid json"
    if "array" in types:
        return "not-an-array"
    if "string" in types:
        if fmt in ("date-time", "date", "time"):
            return "not-a-" + fmt
        if fmt == "uuid":
            return "not-a-uuid"
        if defn.get("enum"):
            return "not-an-enum-value"
        if isinstance(defn.get("maxLength"), int):
            return "x" * (defn["maxLength"] + 10)
    return "not-a-number"


def key_id(key: dict) -> str:
    """Hashable canonical identity of a key object."""
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def key_sort(key: dict, cols: list):
    out = []
    for c in cols or sorted(key):
        v = key.get(c)
        if v is None:
            out.append((0, 0, ""))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append((1, v, ""))
        else:
            out.append((2, 0, json.dumps(v, sort_keys=True) if not isinstance(v, str) else v))
    return tuple(out)


class BadRequest(Exception):
    """A control/API request the emulator rejects with 400 ValidationError."""


# ----------------------------------------------------------------------------------------------
# namespaces: a table is (namespace, bare name); the store keys it by its qualified name, which is
# the bare name for namespace canvas (backwards compatible) and "ns.table" for the others
# ----------------------------------------------------------------------------------------------

def qualify(ns: str, name: str) -> str:
    return name if ns == DEFAULT_NS else f"{ns}.{name}"


def split_table(name, namespace=None, where="table"):
    """-> (namespace, bare name) of a table named "table" (namespace canvas) or "ns.table",
    optionally with an explicit namespace (which must agree with a qualified name)."""
    if not isinstance(name, str) or not name:
        raise BadRequest(f"{where} must be a non-empty string")
    if namespace is not None and namespace not in NAMESPACES:
        raise BadRequest(f"{where}: unknown namespace {namespace!r} (known: {', '.join(NAMESPACES)})")
    ns, bare = None, name
    head, dot, rest = name.partition(".")
    if dot:
        if head not in NAMESPACES or not rest:
            raise BadRequest(f"{where}: {name!r} is not \"table\" or \"namespace.table\" "
                             f"(namespaces: {', '.join(NAMESPACES)})")
        ns, bare = head, rest
    if namespace is not None and ns is not None and ns != namespace:
        raise BadRequest(f"{where}: {name!r} is not in namespace {namespace!r}")
    ns = namespace or ns or DEFAULT_NS
    if ns == DEFAULT_NS and "." in bare:  # its qualified name would be another namespace's
        raise BadRequest(f"{where}: a {DEFAULT_NS} table name cannot contain a dot ({name!r})")
    return ns, bare


def window_start(clock: datetime, days):
    """Earliest timestamp inside a retention window of `days` before `clock` (None: unbounded)."""
    try:
        return clock - timedelta(days=float(days))
    except (OverflowError, ValueError):
        return None


def row_time(value: dict):
    """The `timestamp` of a canvas_logs row, or None when absent or not a timestamp."""
    try:
        return parse_ts(value.get("timestamp"))
    except (ValueError, TypeError, AttributeError):
        return None


# ----------------------------------------------------------------------------------------------
# Store: instances, tables, change log, clock
# ----------------------------------------------------------------------------------------------

class Row:
    """Latest state of one key. `value` is the real value the emulator knows. `oversized` holds
    the columns currently exported as PLACEHOLDER; `good` maps such a column to the last value a
    continuously syncing client saw un-truncated (absent: it never saw one)."""
    __slots__ = ("key", "value", "ts", "deleted", "oversized", "good")

    def __init__(self, key: dict, value: dict, ts: datetime, deleted: bool = False):
        self.key = key
        self.value = value
        self.ts = ts
        self.deleted = deleted
        self.oversized = set()
        self.good = {}


class Table:
    def __init__(self, name: str, version: int, schema: dict, namespace: str = DEFAULT_NS):
        self.name = name            # the bare name (as in the API's paths)
        self.namespace = namespace
        self.version = version
        self.schema = schema
        self.rows = {}  # key_id -> Row

    @property
    def qname(self):
        return qualify(self.namespace, self.name)

    @property
    def key_cols(self):
        return key_columns(self.schema)

    @property
    def value_cols(self):
        return value_columns(self.schema)

    def norm_key(self, key) -> dict:
        if not isinstance(key, dict) or not key:
            raise BadRequest(f"table {self.qname}: key must be a non-empty object")
        missing = [c for c in self.key_cols if c not in key]
        if missing:
            raise BadRequest(f"table {self.qname}: key lacks {missing}")
        ordered = {c: key[c] for c in self.key_cols}
        for c, v in key.items():
            ordered.setdefault(c, v)
        return ordered

    def export_value(self, row: Row) -> dict:
        """The value as exported now: current schema columns only, oversized ones truncated."""
        return {c: (PLACEHOLDER if c in row.oversized else row.value.get(c)) for c in self.value_cols}


def _check_schema_entry(where: str, version, schema):
    if not isinstance(version, int) or isinstance(version, bool):
        raise BadRequest(f"{where}: version must be an integer")
    if not isinstance(schema, dict) or not isinstance(schema.get("properties"), dict):
        raise BadRequest(f"{where}: schema must be a JSON Schema object with properties")
    for part in ("key", "value"):
        if not isinstance(schema["properties"].get(part, {}), dict):
            raise BadRequest(f"{where}: schema property {part} must be an object")


class BulkFile:
    """A result file served from disk (bulk tables). Only its path and the size seen at
    registration are kept: downloads stream it in chunks and never read it whole."""
    __slots__ = ("path", "size")

    def __init__(self, path: str):
        self.path = path
        self.size = os.path.getsize(path)


def _bulk_files(where: str, files) -> list:
    if not isinstance(files, list):
        raise BadRequest(f"{where}: files must be a list of absolute paths")
    out = []
    for f in files:
        if not isinstance(f, str) or not os.path.isabs(f):
            raise BadRequest(f"{where}: {f!r} is not an absolute path")
        if not os.path.isfile(f) or not os.access(f, os.R_OK):
            raise BadRequest(f"{where}: {f} is not a readable file")
        out.append(BulkFile(f))
    return out


def _bulk_ts(where: str, value) -> datetime:
    try:
        return parse_ts(value)
    except ValueError as e:
        raise BadRequest(f"{where}: {e}")


class BulkTable:
    """A table whose jobs are answered from files on disk (POST /_emu/bulk), for data sets too
    large for the in-memory store: a snapshot (files, "at") and a chain of incrementals (files,
    "since", "until"). The emulator keeps no rows of it: no epochs, no expected state."""

    def __init__(self, name: str, body: dict, serial: int, namespace: str = DEFAULT_NS):
        self.name = name
        self.namespace = namespace
        self.serial = serial  # a new registration never reuses the jobs of an old one
        name = qualify(namespace, name)  # in messages
        self.version = body.get("version", 1)
        _check_schema_entry(f"bulk table {name}", self.version, body.get("schema"))
        self.schema = copy.deepcopy(body["schema"])
        self.fmt = body.get("format")
        if self.fmt not in SUPPORTED_FORMATS:
            raise BadRequest(f"bulk table {name}: format must be one of {', '.join(SUPPORTED_FORMATS)}")
        snap = body.get("snapshot")
        if not isinstance(snap, dict):
            raise BadRequest(f"bulk table {name}: snapshot must be {{at, files}}")
        self.at = _bulk_ts(f"bulk table {name}: snapshot at", snap.get("at"))
        self.snapshot_files = _bulk_files(f"bulk table {name}: snapshot", snap.get("files"))
        incs = body.get("incrementals", []) or []
        if not isinstance(incs, list):
            raise BadRequest(f"bulk table {name}: incrementals must be a list")
        self.incrementals = []  # (since, until, files), by since
        for i, inc in enumerate(incs):
            where = f"bulk table {name}: incrementals[{i}]"
            if not isinstance(inc, dict):
                raise BadRequest(f"{where} must be {{since, until, files}}")
            since = _bulk_ts(f"{where} since", inc.get("since"))
            until = _bulk_ts(f"{where} until", inc.get("until"))
            if until < since:
                raise BadRequest(f"{where}: until is earlier than since")
            if since < self.at:
                raise BadRequest(f"{where}: since is earlier than the snapshot's at")
            if any(s == since for s, _u, _f in self.incrementals):
                raise BadRequest(f"{where}: another incremental has the same since")
            self.incrementals.append((since, until, _bulk_files(where, inc.get("files"))))
        self.incrementals.sort(key=lambda x: x[0])
        self.clock = max([self.at] + [u for _s, u, _f in self.incrementals])

    def result(self, since, until):
        """-> (result dict, list of BulkFile) of a query; raises BadRequest when no file set fits."""
        name = qualify(self.namespace, self.name)
        if since is None:
            return {"at": fmt_ts(self.at)}, list(self.snapshot_files)
        for s, u, files in self.incrementals:
            if s == since:
                if until is not None and until != u:
                    raise BadRequest(f"bulk table {name}: the incremental since {fmt_ts(s)} "
                                     f"ends at {fmt_ts(u)}; until cannot cut it")
                return {"since": fmt_ts(s), "until": fmt_ts(u)}, list(files)
        if since >= self.clock:  # nothing new since then
            if until is not None and until != since:
                raise BadRequest(f"bulk table {name}: no data after {fmt_ts(self.clock)}")
            return {"since": fmt_ts(since), "until": fmt_ts(since)}, []
        raise BadRequest(f"bulk table {name}: no incremental starts at {fmt_ts(since)} (known: "
                         + ", ".join(fmt_ts(s) for s, _u, _f in self.incrementals) + ")")

    def summary(self, client_id: str) -> dict:
        return {"client_id": client_id, "table": self.name, "namespace": self.namespace,
                "version": self.version, "format": self.fmt,
                "at": fmt_ts(self.at), "files": len(self.snapshot_files),
                "bytes": sum(f.size for f in self.snapshot_files),
                "incrementals": [{"since": fmt_ts(s), "until": fmt_ts(u), "files": len(fs),
                                  "bytes": sum(f.size for f in fs)} for s, u, fs in self.incrementals]}


class Store:
    """All table data. Not thread-safe by itself: the Emulator lock protects it."""

    def __init__(self):
        self.instances = {}
        self.start = self.clock = parse_ts(DEFAULT_START)
        self.bulk_serial = 0

    # -- loading ---------------------------------------------------------------------------------
    def load(self, scenario: dict):
        if not isinstance(scenario, dict):
            raise BadRequest("scenario must be a JSON object")
        try:
            start = parse_ts(scenario.get("start", DEFAULT_START))
        except ValueError as e:
            raise BadRequest(f"scenario start: {e}")
        insts = scenario.get("instances", {})
        if not isinstance(insts, dict):
            raise BadRequest("scenario instances must be an object")
        new = {}
        for cid, inst in insts.items():
            if not isinstance(inst, dict) or not isinstance(inst.get("secret"), str):
                raise BadRequest(f"instance {cid}: needs a string secret")
            tables = {}
            for tname, tdef in (inst.get("tables") or {}).items():
                ns, bare = split_table(tname, where=f"{cid}/{tname}")
                if qualify(ns, bare) in tables:
                    raise BadRequest(f"{cid}/{tname}: table {qualify(ns, bare)} is given twice")
                if not isinstance(tdef, dict):
                    raise BadRequest(f"{cid}/{tname}: table must be an object")
                version = tdef.get("version", 1)
                _check_schema_entry(f"{cid}/{tname}", version, tdef.get("schema"))
                t = Table(bare, version, copy.deepcopy(tdef["schema"]), ns)
                for r in tdef.get("rows", []) or []:
                    if not isinstance(r, dict):
                        raise BadRequest(f"{cid}/{tname}: rows must be objects")
                    k = t.norm_key(r.get("key"))
                    v = r.get("value", {}) or {}
                    if not isinstance(v, dict):
                        raise BadRequest(f"{cid}/{tname}: row value must be an object")
                    kid = key_id(k)
                    if kid in t.rows:
                        raise BadRequest(f"{cid}/{tname}: duplicate key {kid}")
                    t.rows[kid] = Row(k, copy.deepcopy(v), start)
                tables[t.qname] = t
            new[cid] = {"secret": inst["secret"], "tables": tables, "bulk": {}}
        self.instances = new
        self.start = self.clock = start

    # inst["tables"] and inst["bulk"] are keyed by qualified name (see qualify)
    def table(self, client_id: str, name: str, namespace: str = DEFAULT_NS):
        inst = self.instances.get(client_id)
        if not inst or (namespace == DEFAULT_NS and "." in name):  # never another namespace's table
            return None
        return inst["tables"].get(qualify(namespace, name))

    def bulk_table(self, client_id: str, name: str, namespace: str = DEFAULT_NS):
        inst = self.instances.get(client_id)
        if not inst or (namespace == DEFAULT_NS and "." in name):
            return None
        return inst["bulk"].get(qualify(namespace, name))

    def table_names(self, client_id: str, namespace: str = DEFAULT_NS) -> list:
        """Bare names of the namespace's tables (in-memory and bulk)."""
        inst = self.instances[client_id]
        return sorted({t.name for t in list(inst["tables"].values()) + list(inst["bulk"].values())
                       if t.namespace == namespace})

    # -- bulk tables -----------------------------------------------------------------------------
    def register_bulk(self, body) -> dict:
        """POST /_emu/bulk: registers (or replaces) a table served from files."""
        if not isinstance(body, dict):
            raise BadRequest("bulk body must be an object")
        unknown = set(body) - {"client_id", "secret", "table", "namespace", "version", "schema", "format",
                               "snapshot", "incrementals"}
        if unknown:
            raise BadRequest(f"bulk: unknown keys {sorted(unknown)}")
        cid, tname = body.get("client_id"), body.get("table")
        if not isinstance(cid, str) or not cid:
            raise BadRequest("bulk: client_id must be a string")
        if not isinstance(tname, str) or not tname:
            raise BadRequest("bulk: table must be a string")
        ns, bare = split_table(tname, body.get("namespace"), where="bulk: table")
        if cid not in self.instances and not isinstance(body.get("secret"), str):
            raise BadRequest(f"bulk: unknown client_id {cid!r} (give a secret to create it)")
        self.bulk_serial += 1
        bt = BulkTable(bare, body, self.bulk_serial, ns)  # validates everything before any change
        inst = self.instances.setdefault(cid, {"secret": body.get("secret"), "tables": {}, "bulk": {}})
        inst["tables"].pop(qualify(ns, bare), None)  # a bulk table replaces an in-memory one of that name
        inst["bulk"][qualify(ns, bare)] = bt
        return bt.summary(cid)

    def drop_bulk(self, client_id, name, namespace=None) -> bool:
        inst = self.instances.get(client_id)
        if not inst or not isinstance(name, str) or not name:
            return False
        ns, bare = split_table(name, namespace)
        return inst["bulk"].pop(qualify(ns, bare), None) is not None

    # -- epochs ----------------------------------------------------------------------------------
    def apply_epoch(self, body: dict) -> datetime:
        """Validate the whole epoch first, then apply it (atomic). Within one change the order is
        schema, upsert, delete, oversized; changes are applied in list order."""
        if not isinstance(body, dict):
            raise BadRequest("epoch body must be an object")
        if body.get("at") is None:
            at = self.clock + timedelta(hours=1)
        else:
            try:
                at = parse_ts(body["at"])
            except ValueError as e:
                raise BadRequest(f"at: {e}")
        if at <= self.clock:
            raise BadRequest(f"at ({fmt_ts(at)}) must be later than the clock ({fmt_ts(self.clock)})")
        changes = body.get("changes", [])
        if not isinstance(changes, list):
            raise BadRequest("changes must be a list")

        # ---- validation pass
        plan = []
        for i, ch in enumerate(changes):
            where = f"changes[{i}]"
            if not isinstance(ch, dict):
                raise BadRequest(f"{where} must be an object")
            unknown = set(ch) - {"client_id", "table", "namespace", "upsert", "delete", "oversized", "schema"}
            if unknown:
                raise BadRequest(f"{where}: unknown keys {sorted(unknown)}")
            cid, tname = ch.get("client_id"), ch.get("table")
            if cid not in self.instances:
                raise BadRequest(f"{where}: unknown client_id {cid!r}")
            if not isinstance(tname, str) or not tname:
                raise BadRequest(f"{where}: table must be a string")
            ns, bare = split_table(tname, ch.get("namespace"), where=f"{where}: table")
            tname = qualify(ns, bare)  # the store's key
            if tname in self.instances[cid]["bulk"]:
                raise BadRequest(f"{where}: table {tname!r} is a bulk table (served from files): "
                                 "epochs cannot change it")
            table = self.instances[cid]["tables"].get(tname)
            sch = ch.get("schema")
            if sch is not None:
                if not isinstance(sch, dict):
                    raise BadRequest(f"{where}: schema must be {{version, schema}}")
                _check_schema_entry(where, sch.get("version"), sch.get("schema"))
            if table is None and sch is None:
                raise BadRequest(f"{where}: unknown table {tname!r} (give a schema to create it)")
            # a throw-away table object to normalise keys against the schema in force
            probe = Table(bare, 0, sch["schema"] if sch else table.schema, ns)
            ups, dels, ovs = [], [], []
            for u in ch.get("upsert", []) or []:
                if not isinstance(u, dict):
                    raise BadRequest(f"{where}: upsert items must be objects")
                v = u.get("value", {}) or {}
                if not isinstance(v, dict):
                    raise BadRequest(f"{where}: upsert value must be an object")
                ups.append((probe.norm_key(u.get("key")), v))
            for d in ch.get("delete", []) or []:
                if not isinstance(d, dict):
                    raise BadRequest(f"{where}: delete items must be objects")
                dels.append(probe.norm_key(d.get("key")))
            live_after = set()
            if table is not None:
                live_after = {kid for kid, r in table.rows.items() if not r.deleted}
            live_after |= {key_id(k) for k, _ in ups}
            live_after -= {key_id(k) for k in dels}
            for o in ch.get("oversized", []) or []:
                if not isinstance(o, dict) or not isinstance(o.get("column"), str):
                    raise BadRequest(f"{where}: oversized items need key and column")
                k = probe.norm_key(o.get("key"))
                if o["column"] in probe.key_cols:
                    raise BadRequest(f"{where}: a key column cannot be oversized")
                if key_id(k) not in live_after:
                    raise BadRequest(f"{where}: oversized row {key_id(k)} is not live")
                ovs.append((k, o["column"]))
            plan.append((cid, tname, sch, ups, dels, ovs, ns, bare))

        # ---- state of the oversized rows before this epoch (see Row.good)
        before = {}
        for cid, tname, _s, _u, _d, ovs, _ns, _b in plan:
            table = self.instances[cid]["tables"].get(tname)
            for k, _c in ovs:
                r = table.rows.get(key_id(k)) if table else None
                if r is not None and not r.deleted:
                    before.setdefault((cid, tname, key_id(k)),
                                      (copy.deepcopy(r.value), set(r.oversized), dict(r.good)))

        # ---- apply
        for cid, tname, sch, ups, dels, ovs, ns, bare in plan:
            tables = self.instances[cid]["tables"]
            if sch is not None:
                if tname in tables:
                    tables[tname].version = sch["version"]
                    tables[tname].schema = copy.deepcopy(sch["schema"])
                else:
                    tables[tname] = Table(bare, sch["version"], copy.deepcopy(sch["schema"]), ns)
            table = tables[tname]
            for k, v in ups:
                table.rows[key_id(k)] = Row(k, copy.deepcopy(v), at)
            for k in dels:
                old = table.rows.get(key_id(k))
                # deleting an unknown key still records a tombstone (clients must shrug it off)
                table.rows[key_id(k)] = Row(k, old.value if old else {}, at, deleted=True)
            for k, col in ovs:
                row = table.rows[key_id(k)]
                prev = before.get((cid, tname, key_id(k)))
                if col not in row.oversized:
                    row.good.pop(col, None)
                    if prev is not None:
                        pvalue, poversized, pgood = prev
                        if col in poversized:
                            if col in pgood:
                                row.good[col] = pgood[col]
                        else:
                            row.good[col] = pvalue.get(col)
                row.oversized.add(col)
                row.ts = at  # the truncated re-export is a change of that row at this epoch
        self.clock = at
        return at

    # -- queries ---------------------------------------------------------------------------------
    def log_window(self, table, days, clock=None):
        """Start of the retention window of a canvas_logs table (None for other namespaces)."""
        if table.namespace != LOG_NS:
            return None
        return window_start(self.clock if clock is None else clock, days)

    @staticmethod
    def in_window(row: Row, start) -> bool:
        """A row is outside the window only when its `timestamp` is known and older than start."""
        if start is None:
            return True
        t = row_time(row.value)
        return t is None or t >= start

    def snapshot(self, table: Table, window=None) -> list:
        recs = []
        for r in table.rows.values():
            if not r.deleted and self.in_window(r, window):
                recs.append({"key": r.key, "value": table.export_value(r), "ts": r.ts, "action": None})
        recs.sort(key=lambda x: key_sort(x["key"], table.key_cols))
        return recs

    def incremental(self, table: Table, since: datetime, until: datetime,
                    since_inclusive: bool, until_inclusive: bool) -> list:
        recs = []
        for r in table.rows.values():
            lo_ok = r.ts >= since if since_inclusive else r.ts > since
            hi_ok = r.ts <= until if until_inclusive else r.ts < until
            if not (lo_ok and hi_ok):
                continue
            if r.deleted:
                recs.append({"key": r.key, "value": None, "ts": r.ts, "action": "D"})
            else:
                recs.append({"key": r.key, "value": table.export_value(r), "ts": r.ts, "action": "U"})
        recs.sort(key=lambda x: (x["ts"], key_sort(x["key"], table.key_cols)))
        return recs

    def expected_rows(self, table: Table, fresh: bool = False, window=None) -> list:
        """Rows a correct client holds after syncing to the clock (see README: oversized columns);
        with a window, only the rows whose timestamp is in it (canvas_logs)."""
        out = []
        for r in table.rows.values():
            if r.deleted or not self.in_window(r, window):
                continue
            value = {}
            for c in table.value_cols:
                if c in r.oversized:
                    if not fresh and c in r.good:
                        value[c] = r.good[c]
                    else:
                        value[c] = PLACEHOLDER if is_string_column(column_def(table.schema, c)) else None
                else:
                    value[c] = r.value.get(c)
            out.append({"key": r.key, "value": value})
        out.sort(key=lambda x: key_sort(x["key"], table.key_cols))
        return out


# ----------------------------------------------------------------------------------------------
# FileEncoder: records -> files
# ----------------------------------------------------------------------------------------------

def text_value(v):
    """Text form of a value in csv/tsv (None stays None = NULL)."""
    if v is None:
        return None
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, (int, float)):
        return json.dumps(v)
    if isinstance(v, str):
        return v
    return compact_json(v)


def csv_field(s) -> str:
    """RFC 4180 field. NULL = empty unquoted field; empty string = "" (quoted)."""
    if s is None:
        return ""
    if s == "" or any(ch in s for ch in ',"\r\n'):
        return '"' + s.replace('"', '""') + '"'
    return s


def tsv_field(s) -> str:
    """PostgreSQL COPY text format field."""
    if s is None:
        return "\\N"
    return s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


class FileEncoder:
    """Encodes a job's records into its files (gzip bytes), following the config."""

    def __init__(self, config: dict, rng: random.Random):
        self.cfg = config
        self.rng = rng

    def build(self, fmt: str, table: Table, records: list, incremental: bool,
              malformed: str = None) -> list:
        parts = max(1, int(self.cfg["parts"]))
        n_data = min(parts, len(records))
        chunks = []
        for i in range(n_data):  # near-equal contiguous chunks, each with >= 1 record
            lo = len(records) * i // n_data
            hi = len(records) * (i + 1) // n_data
            chunks.append(records[lo:hi])
        data_files = [self.encode(fmt, table, c, incremental) for c in chunks]
        empty_files = [self.encode(fmt, table, [], incremental) for _ in range(int(self.cfg["empty_parts"]))]
        if malformed:
            target = data_files[0] if data_files else (empty_files[0] if empty_files else None)
            if target is None:
                target = self.encode(fmt, table, [], incremental)
                data_files.append(target)
            if malformed == "end_marker" and fmt == "tsv" and len(target[0]) > 1:
                # a line of an unescaped \. alone (COPY's end-of-data marker) before the
                # file's records
                target[0].insert(1, b"\\.\n")
            else:
                target[0].append(self.bad_line(fmt, target[1], malformed, target[0]))
        # interleave: data0, empty0, data1, empty1, ... (empty files are not all at the end)
        ordered = []
        for i in range(max(len(data_files), len(empty_files))):
            if i < len(data_files):
                ordered.append(data_files[i])
            if i < len(empty_files):
                ordered.append(empty_files[i])
        return [self.gzip_lines(lines) for lines, _n in ordered]

    # -- one file -> (list of byte lines, number of columns)
    def encode(self, fmt: str, table: Table, records: list, incremental: bool):
        if fmt == "jsonl":
            return [self.jsonl_line(table, r, incremental) for r in records], 0
        cols = ["meta.ts"] + (["meta.action"] if incremental else []) \
            + ["key." + c for c in table.key_cols] + ["value." + c for c in table.value_cols]
        if self.cfg["shuffle"]:
            self.rng.shuffle(cols)
        if fmt == "csv":
            nl = self.cfg["csv_newline"]
            join = lambda fields: (",".join(csv_field(f) for f in fields) + nl).encode("utf-8")  # noqa: E731
        else:
            join = lambda fields: ("\t".join(tsv_field(f) for f in fields) + "\n").encode("utf-8")  # noqa: E731
        lines = [join(cols)]
        for r in records:
            lines.append(join([text_value(self.cell(r, c)) for c in cols]))
        return lines, len(cols)

    @staticmethod
    def cell(r: dict, col: str):
        part, _, name = col.partition(".")
        if part == "meta":
            return fmt_ts(r["ts"]) if name == "ts" else r["action"]
        if part == "key":
            return r["key"].get(name)
        return None if r["value"] is None else r["value"].get(name)

    def jsonl_line(self, table: Table, r: dict, incremental: bool) -> bytes:
        meta = {"ts": fmt_ts(r["ts"])}
        if incremental:
            meta["action"] = r["action"]
        obj = {"key": dict(r["key"])}
        if r["value"] is not None:
            if self.cfg["null_style"] == "omit":
                obj["value"] = {c: v for c, v in r["value"].items() if v is not None}
            else:
                obj["value"] = dict(r["value"])
        obj["meta"] = meta
        if self.cfg["shuffle"]:
            obj = self.shuffled(obj)
            for part in ("value", "meta"):
                if part in obj:
                    obj[part] = self.shuffled(obj[part])
        return (compact_json(obj) + "\n").encode("utf-8")

    def shuffled(self, d: dict) -> dict:
        items = list(d.items())
        self.rng.shuffle(items)
        return dict(items)

    @staticmethod
    def bad_line(fmt: str, ncols: int, shape: str = "missing_field", lines: list = ()) -> bytes:
        if fmt == "jsonl":
            if shape == "control_quote":
                # a raw 0x02 (JSON escapes control characters), then 50 lines of 100 bytes
                return b'{"key": {"id": 1}, "value": {"name": "\x02' + (b"y" * 99 + b"\n") * 50
            return b'{"key": {"id": \n'
        sep = "," if fmt == "csv" else "\t"
        if shape == "extra_field" and len(lines) > 1:
            # the file's last record again, every value valid, with one field too many
            return lines[-1].rstrip(b"\r\n") + sep.encode() + b"extra\n"
        # a record with the wrong number of fields (one fewer than the header)
        return (sep.join(["malformed"] * max(1, ncols - 1)) + "\n").encode()

    def gzip_lines(self, lines: list) -> bytes:
        if not lines:
            return gzip.compress(b"", mtime=0)
        members = min(3, len(lines)) if self.cfg["multi_member"] else 1
        out = []
        for i in range(members):  # split at record boundaries (the header goes in member 0)
            lo, hi = len(lines) * i // members, len(lines) * (i + 1) // members
            out.append(gzip.compress(b"".join(lines[lo:hi]), mtime=0))
        return b"".join(out)


# ----------------------------------------------------------------------------------------------
# Jobs
# ----------------------------------------------------------------------------------------------

class Job:
    def __init__(self, client_id, table, fmt, created, latency, lifetime, schema_version,
                 result, objects, error=None, namespace=DEFAULT_NS):
        self.id = str(uuid.uuid4())
        self.client_id = client_id
        self.table = table              # bare name
        self.namespace = namespace
        self.fmt = fmt
        self.created = created          # wall time (time.time())
        self.latency = latency
        self.expires = created + lifetime
        self.expired = False            # set by the expire_job fault
        self.schema_version = schema_version
        self.result = result            # {"at": ...} or {"since": ..., "until": ...}
        self.error = error              # failed jobs
        # objects: list of (object id, gzip bytes); ids are <jobid>/part-00000-<n>.<fmt>.gz with
        # non-contiguous n (0, 3, 7, 12, ...)
        self.objects = [(f"{self.id}/part-00000-{k * (k + 5) // 2}.{fmt}.gz", data)
                        for k, data in enumerate(objects)]
        self.files = dict(self.objects)
        self.dedupe_key = None

    def is_gone(self, now):
        return self.expired or now >= self.expires

    def status(self, now):
        elapsed = now - self.created
        if elapsed < self.latency / 2:
            return "waiting"
        if elapsed < self.latency:
            return "running"
        return "failed" if self.error else "complete"

    def view(self, now) -> dict:
        st = self.status(now)
        d = {"id": self.id, "status": st, "expires_at": wall_iso(self.expires)}
        if st == "complete":
            d["schema_version"] = self.schema_version
            d["objects"] = [{"id": oid} for oid, _ in self.objects]
            d.update(self.result)
        elif st == "failed":
            d["error"] = self.error
        return d


class Jobs:
    def __init__(self):
        self.by_id = {}
        self.by_object = {}
        self.dedupe = {}

    def add(self, job: Job, dedupe_key=None):
        self.by_id[job.id] = job
        for oid, _ in job.objects:
            self.by_object[oid] = job
        if dedupe_key is not None:
            job.dedupe_key = dedupe_key
            self.dedupe[dedupe_key] = job

    def find_dedupe(self, key, now):
        job = self.dedupe.get(key)
        if job is not None and job.is_gone(now):
            return None
        return job

    def get(self, job_id, now):
        job = self.by_id.get(job_id)
        return None if job is None or job.is_gone(now) else job

    def expire(self, job: Job):
        job.expired = True
        if job.dedupe_key is not None and self.dedupe.get(job.dedupe_key) is job:
            del self.dedupe[job.dedupe_key]

    def purge(self, now):
        """Forget jobs that expired more than an hour ago (keeps memory bounded)."""
        for jid, job in list(self.by_id.items()):
            if job.is_gone(now - 3600):
                del self.by_id[jid]
                for oid, _ in job.objects:
                    self.by_object.pop(oid, None)
                if job.dedupe_key is not None and self.dedupe.get(job.dedupe_key) is job:
                    del self.dedupe[job.dedupe_key]


# ----------------------------------------------------------------------------------------------
# Tokens (login)
# ----------------------------------------------------------------------------------------------

class Tokens:
    def __init__(self):
        self.key = os.urandom(32)
        self.tokens = {}  # token -> {"client_id", "exp", "revoked"}

    def issue(self, client_id: str, lifetime: float, now: float) -> str:
        header = {"alg": "HS256", "typ": "JWT"}
        payload = {"sub": client_id, "iat": int(now), "exp": int(now + lifetime),
                   "jti": uuid.uuid4().hex, "iss": "cd2emu"}
        signing = b64url(compact_json(header).encode()) + "." + b64url(compact_json(payload).encode())
        sig = hmac.new(self.key, signing.encode(), hashlib.sha256).digest()
        token = signing + "." + b64url(sig)
        self.tokens[token] = {"client_id": client_id, "exp": now + lifetime, "revoked": False}
        for t, info in list(self.tokens.items()):  # forget long-dead tokens
            if info["exp"] < now - 3600:
                del self.tokens[t]
        return token

    def resolve(self, token, now):
        """-> (client_id or None, problem or None)."""
        if not token:
            return None, "missing access token"
        info = self.tokens.get(token)
        if info is None:
            return None, "unknown access token"
        if info["revoked"]:
            return info["client_id"], "access token revoked"
        if now >= info["exp"]:
            return info["client_id"], "access token expired"
        return info["client_id"], None

    def revoke(self, client_id) -> int:
        n = 0
        for info in self.tokens.values():
            if info["client_id"] == client_id and not info["revoked"]:
                info["revoked"] = True
                n += 1
        return n


# ----------------------------------------------------------------------------------------------
# Rate limits
# ----------------------------------------------------------------------------------------------

class RateLimiter:
    """Sliding one-minute windows of accepted requests per (credential, endpoint)."""

    def __init__(self):
        self.windows = {}

    def check(self, limits: dict, client_id, endpoint, now):
        """-> None if allowed (and counted), else the seconds until a slot frees up."""
        limit = (limits or {}).get(endpoint)
        if limit is None:
            return None
        dq = self.windows.setdefault((client_id, endpoint), collections.deque())
        while dq and dq[0] <= now - 60:
            dq.popleft()
        if len(dq) >= limit:
            return max(1, math.ceil(dq[0] + 60 - now)) if dq else 60
        dq.append(now)
        return None


# ----------------------------------------------------------------------------------------------
# Faults
# ----------------------------------------------------------------------------------------------

GENERIC_KINDS = {"status", "reset", "hang", "revoke_tokens"}
SPECIFIC_KINDS = {  # kind -> the only endpoint where it can fire
    "reset_mid_body": "download", "corrupt_gzip": "download", "truncated_gzip": "download",
    "expire_url": "download",
    "malformed_record": "create_job", "bad_value": "create_job", "job_failed": "create_job",
    "snapshot_required": "create_job", "out_of_range": "create_job",
    "expire_job": "object_urls",
}
RULE_KEYS = {"endpoint", "table", "namespace", "client_id", "times", "kind", "status", "error_type", "message",
             "retry_after", "seconds", "column", "since", "shape", "note"}
DEFAULT_ERROR_TYPES = {400: "ValidationError", 401: "AuthenticationError", 403: "AccountNotOnboarded",
                       404: "NotFound", 409: "Conflict", 429: "TooManyRequests",
                       500: "InternalServerError", 502: "BadGateway", 503: "ServiceUnavailable",
                       504: "GatewayTimeout"}


class FaultRules:
    def __init__(self):
        self.rules = []
        self.fired = 0

    @staticmethod
    def validate(rule) -> dict:
        if not isinstance(rule, dict):
            raise BadRequest("a fault rule must be an object")
        unknown = set(rule) - RULE_KEYS
        if unknown:
            raise BadRequest(f"fault rule: unknown keys {sorted(unknown)}")
        r = dict(rule)
        r.setdefault("endpoint", "any")
        r.setdefault("times", 1)
        kind = r.get("kind")
        if r["endpoint"] not in ENDPOINTS + ("any",):
            raise BadRequest(f"fault rule: unknown endpoint {r['endpoint']!r}")
        if kind not in GENERIC_KINDS and kind not in SPECIFIC_KINDS:
            raise BadRequest(f"fault rule: unknown kind {kind!r}")
        if kind in SPECIFIC_KINDS and r["endpoint"] not in (SPECIFIC_KINDS[kind], "any"):
            raise BadRequest(f"fault rule: kind {kind} only applies to endpoint {SPECIFIC_KINDS[kind]}")
        if r.get("namespace") is not None and r["namespace"] not in NAMESPACES:
            raise BadRequest(f"fault rule: unknown namespace {r['namespace']!r} (known: {', '.join(NAMESPACES)})")
        if r.get("table") is not None:
            if not isinstance(r["table"], str) or not r["table"]:
                raise BadRequest("fault rule: table must be a non-empty string")
            if "." in r["table"]:  # "ns.table": that namespace and that table
                r["namespace"], r["table"] = split_table(r["table"], r.get("namespace"), "fault rule: table")
        t = r["times"]
        if not isinstance(t, int) or isinstance(t, bool) or (t < 1 and t != -1):
            raise BadRequest("fault rule: times must be a positive integer or -1")
        if kind == "status":
            s = r.get("status")
            if not isinstance(s, int) or not 400 <= s <= 599:
                raise BadRequest("fault rule: kind status needs an integer status 400..599")
        if kind == "hang":
            s = r.setdefault("seconds", 30)
            if not isinstance(s, (int, float)) or s < 0:
                raise BadRequest("fault rule: seconds must be a non-negative number")
        if kind in ("malformed_record", "bad_value") and not r.get("table"):
            raise BadRequest(f"fault rule: kind {kind} needs a table")
        if kind == "malformed_record":
            if r.setdefault("shape", "missing_field") not in ("missing_field", "extra_field", "control_quote",
                                                              "end_marker"):
                raise BadRequest("fault rule: shape must be missing_field, extra_field, control_quote or end_marker")
        elif "shape" in r:
            raise BadRequest("fault rule: shape only applies to malformed_record")
        if kind == "bad_value" and not isinstance(r.get("column"), str):
            raise BadRequest("fault rule: kind bad_value needs a column")
        if "retry_after" in r and r["retry_after"] is not None:
            r["retry_after"] = str(r["retry_after"])
        r["fired"] = 0
        return r

    def add(self, rules):
        if not isinstance(rules, list):
            raise BadRequest("faults must be a list of rules")
        new = [self.validate(x) for x in rules]
        self.rules.extend(new)
        return len(new)

    def take(self, endpoint, table, client_id, kinds, pred=None, namespace=None):
        """Fire the first rule matching this request whose kind is in `kinds`; return a copy.
        `table` is the bare name, `namespace` the request's (None: a request of no namespace)."""
        for r in self.rules:
            if r["kind"] not in kinds or r["endpoint"] not in (endpoint, "any"):
                continue
            if r.get("table") is not None and r["table"] != table:
                continue
            if r.get("namespace") is not None and r["namespace"] != namespace:
                continue
            if r.get("client_id") is not None and r["client_id"] != client_id:
                continue
            if pred is not None and not pred(r):
                continue
            r["fired"] += 1
            self.fired += 1
            if r["times"] > 0:
                r["times"] -= 1
                if r["times"] == 0:
                    self.rules.remove(r)
            return dict(r)
        return None


# ----------------------------------------------------------------------------------------------
# Emulator: shared state
# ----------------------------------------------------------------------------------------------

def _is_num(v, minimum=None, strict=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    if minimum is None:
        return True
    return v > minimum if strict else v >= minimum


def _is_int(v, minimum):
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


CONFIG_CHECKS = {
    "job_latency": lambda v: _is_num(v, 0),
    "job_lifetime": lambda v: _is_num(v, 0, strict=True),
    "token_lifetime": lambda v: _is_num(v, 0, strict=True),
    "url_lifetime": lambda v: _is_num(v, 0, strict=True),
    "dedupe_jobs": lambda v: isinstance(v, bool),
    "parts": lambda v: _is_int(v, 1),
    "empty_parts": lambda v: _is_int(v, 0),
    "multi_member": lambda v: isinstance(v, bool),
    "null_style": lambda v: v in ("omit", "null"),
    "shuffle": lambda v: isinstance(v, bool),
    "since_inclusive": lambda v: isinstance(v, bool),
    "until_inclusive": lambda v: isinstance(v, bool),
    "earliest_since": lambda v: v is None or isinstance(v, str),
    "since_too_old_error": lambda v: v in ("SnapshotRequired", "OutOfRange"),
    "formats": lambda v: isinstance(v, list) and all(f in ALL_FORMATS for f in v),
    "rate_limits": lambda v: isinstance(v, dict) and all(
        k in RATE_LIMITED_ENDPOINTS and (x is None or _is_int(x, 0)) for k, x in v.items()),
    "retry_after": lambda v: isinstance(v, bool),
    "csv_newline": lambda v: v in ("\n", "\r\n"),
    "object_base_url": lambda v: v is None or isinstance(v, str),
    "seed": lambda v: _is_int(v, -(2 ** 63)),
    "log_retention_days": lambda v: _is_num(v, 0, strict=True) and math.isfinite(v),
}


class Emulator:
    def __init__(self, scenario=None, quiet=True):
        self.lock = threading.RLock()
        self.quiet = quiet
        self.config = copy.deepcopy(DEFAULT_CONFIG)
        self.store = Store()
        if scenario is not None:
            self.store.load(scenario)
        self.jobs = Jobs()
        self.tokens = Tokens()
        self.limiter = RateLimiter()
        self.faults = FaultRules()
        self.url_key = os.urandom(32)
        self.base_url = "http://127.0.0.1:0"
        self.objects_base_url = None  # --objects-host: presigned URLs name a host of their own
        self.requests = []
        self.stats = self._empty_stats()
        self.job_counter = 0

    @staticmethod
    def _empty_stats():
        return {"total": 0, "endpoints": {}, "statuses": {}, "endpoint_statuses": {},
                "rate_limited": 0, "faults": {}}

    # -- control ---------------------------------------------------------------------------------
    def load(self, scenario):
        with self.lock:
            self.store.load(scenario)
            self.jobs = Jobs()
            self.tokens.tokens.clear()
            self.limiter = RateLimiter()

    def reset(self):
        with self.lock:
            self.config = copy.deepcopy(DEFAULT_CONFIG)
            self.faults = FaultRules()
            self.requests = []
            self.stats = self._empty_stats()
            self.limiter = RateLimiter()

    def set_config(self, updates):
        if not isinstance(updates, dict):
            raise BadRequest("config must be an object")
        for k, v in updates.items():
            if k not in CONFIG_CHECKS:
                raise BadRequest(f"unknown config key {k!r}")
            if not CONFIG_CHECKS[k](v):
                raise BadRequest(f"invalid value for config key {k!r}: {v!r}")
        if updates.get("earliest_since") is not None:
            try:
                updates = dict(updates, earliest_since=fmt_ts(parse_ts(updates["earliest_since"])))
            except ValueError as e:
                raise BadRequest(f"earliest_since: {e}")
        with self.lock:
            self.config.update(copy.deepcopy(updates))
            return copy.deepcopy(self.config)

    def record(self, entry):
        with self.lock:
            if len(self.requests) >= MAX_LOG:
                del self.requests[: MAX_LOG // 10]
            self.requests.append(entry)
            s = self.stats
            ep, st = entry["endpoint"] or "unknown", str(entry["status"])
            s["total"] += 1
            s["endpoints"][ep] = s["endpoints"].get(ep, 0) + 1
            s["statuses"][st] = s["statuses"].get(st, 0) + 1
            es = s["endpoint_statuses"].setdefault(ep, {})
            es[st] = es.get(st, 0) + 1
            if entry.get("rate_limited"):
                s["rate_limited"] += 1
            if entry.get("fault"):
                s["faults"][entry["fault"]] = s["faults"].get(entry["fault"], 0) + 1

    # -- presigned URLs --------------------------------------------------------------------------
    def sign_url(self, oid: str, now: float) -> str:
        payload = b64url(compact_json({"o": oid, "e": round(now + self.config["url_lifetime"], 3)}).encode())
        sig = b64url(hmac.new(self.url_key, payload.encode(), hashlib.sha256).digest()[:20])
        base = (self.config["object_base_url"] or self.objects_base_url or self.base_url).rstrip("/")
        return f"{base}/_obj/{payload}.{sig}"

    def parse_url_token(self, token: str):
        """-> (object id or None, expired?) ; object id None means an invalid signature."""
        try:
            payload, sig = token.split(".", 1)
            want = b64url(hmac.new(self.url_key, payload.encode(), hashlib.sha256).digest()[:20])
            if not hmac.compare_digest(want, sig):
                return None, False
            info = json.loads(b64url_decode(payload))
            return info["o"], time.time() >= info["e"]
        except (ValueError, KeyError, TypeError):
            return None, False

    # -- jobs ------------------------------------------------------------------------------------
    def create_job(self, client_id, table: Table, query: dict, malformed=None, bad_value=None,
                   failed=None):
        """Compute the job's data now (the result reflects the clock at creation)."""
        with self.lock:
            now = time.time()
            cfg = self.config
            self.jobs.purge(now)
            self.job_counter += 1
            rng = random.Random(f"{cfg['seed']}:{self.job_counter}")
            fmt = query["format"]
            incremental = query.get("since") is not None
            if incremental:
                since = parse_ts(query["since"])
                until = parse_ts(query["until"]) if query.get("until") is not None else self.store.clock
                records = self.store.incremental(table, since, until, cfg["since_inclusive"],
                                                 cfg["until_inclusive"])
                result = {"since": fmt_ts(since), "until": fmt_ts(until)}
            else:  # a canvas_logs snapshot holds only the retention window
                records = self.store.snapshot(table, self.store.log_window(table, cfg["log_retention_days"]))
                result = {"at": fmt_ts(self.store.clock)}
            error, files = None, []
            if failed is not None:
                error = {"type": "ProcessingError", "uuid": str(uuid.uuid4()),
                         "message": failed.get("message") or "query failed"}
            else:
                if bad_value is not None:
                    col = bad_value["column"]
                    bad = bad_value_for(column_def(table.schema, col))
                    for i, r in enumerate(records):
                        if r["value"] is not None:
                            records[i] = dict(r, value=dict(r["value"], **{col: bad}))
                            break
                files = FileEncoder(cfg, rng).build(fmt, table, records, incremental,
                                                    malformed=malformed["shape"] if malformed else None)
            job = Job(client_id, table.name, fmt, now, float(cfg["job_latency"]),
                      float(cfg["job_lifetime"]), table.version, result, files, error,
                      namespace=table.namespace)
            return job

    def create_bulk_job(self, client_id, table: BulkTable, since, until, failed=None):
        """A job of a bulk table: its objects are the registered files (no empty parts)."""
        with self.lock:
            now = time.time()
            cfg = self.config
            self.jobs.purge(now)
            self.job_counter += 1
            result, files = table.result(since, until)
            error = None
            if failed is not None:
                error = {"type": "ProcessingError", "uuid": str(uuid.uuid4()),
                         "message": failed.get("message") or "query failed"}
                files = []
            return Job(client_id, table.name, table.fmt, now, float(cfg["job_latency"]),
                       float(cfg["job_lifetime"]), table.version, result, files, error,
                       namespace=table.namespace)


# ----------------------------------------------------------------------------------------------
# HTTP
# ----------------------------------------------------------------------------------------------

class Abort(Exception):
    """Stop handling the request (the response has been sent or the connection dropped)."""


def s3_error_xml(code: str, message: str) -> bytes:
    rid = uuid.uuid4().hex[:16].upper()
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<RequestId>{rid}</RequestId><HostId>{b64url(os.urandom(24))}</HostId></Error>").encode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive; every response carries Content-Length
    server_version = "cd2emu/1.0"
    sys_version = ""
    timeout = 300                   # idle keep-alive connections are dropped after this
    disable_nagle_algorithm = True

    # -- plumbing --------------------------------------------------------------------------------
    @property
    def emu(self) -> Emulator:
        return self.server.emu

    def setup(self):
        super().setup()
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()  # in the handler thread, never in the accept loop

    def handle(self):
        try:
            super().handle()
        except (ConnectionError, TimeoutError, ssl.SSLError, OSError):
            self.close_connection = True

    def log_request(self, code="-", size="-"):
        pass  # we log in _dispatch

    def log_message(self, format, *args):
        if not self.emu.quiet:
            log("cd2emu: %s %s" % (self.address_string(), format % args))

    def do_GET(self):
        self._dispatch()

    do_POST = do_DELETE = do_HEAD = do_PUT = do_PATCH = do_GET

    def _read_body(self) -> bytes:
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            chunks, total = [], 0
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise ConnectionError("eof in chunked body")
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                total += size
                if total > MAX_BODY:
                    raise BadRequest("request body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(3)
            return b"".join(chunks)
        n = self.headers.get("Content-Length")
        if not n:
            return b""
        n = int(n)
        if n < 0 or n > MAX_BODY:
            raise BadRequest("bad Content-Length")
        return self.rfile.read(n)

    def _send(self, status: int, body: bytes = b"", ctype: str = "application/json",
              headers=None, length=None):
        """Send a complete response in one write (headers + body); always with Content-Length."""
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self._headers_buffer.append(b"\r\n")
        head = b"".join(self._headers_buffer)
        self._headers_buffer = []
        self.wfile.write(head + (b"" if self.command == "HEAD" else body))

    def _json(self, status: int, obj, headers=None):
        self._send(status, (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8"),
                   "application/json; charset=utf-8", headers)

    def _err(self, status: int, etype: str, message: str, headers=None, **extra):
        err = {"type": etype, "uuid": str(uuid.uuid4()), "message": message}
        err.update(extra)
        self._json(status, {"error": err}, headers)

    def _xml_error(self, status: int, code: str, message: str):
        self._send(status, s3_error_xml(code, message), "application/xml")

    def _rst(self):
        """Drop the connection with a TCP RST and no response."""
        self._status = 0
        self.close_connection = True
        try:
            self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        try:
            self.rfile.close()
            self.request.close()
        except OSError:
            pass
        raise Abort()

    # -- dispatch --------------------------------------------------------------------------------
    def _dispatch(self):
        t0 = time.time()
        self._status = None
        self._endpoint = None
        self._table = None
        self._namespace = None
        self._fault = None
        self._rate_limited = False
        path = self.path.split("?", 1)[0]
        query = self.path.split("?", 1)[1] if "?" in self.path else ""
        control = path == "/_emu" or path.startswith("/_emu/")
        try:
            try:
                self._body = self._read_body()
            except (BadRequest, ValueError) as e:
                self.close_connection = True
                self._err(400, "ValidationError", f"bad request body: {e}")
                return
            if control:
                self._control(path, query)
            else:
                self._api(path)
        except Abort:
            pass
        except (ConnectionError, TimeoutError, ssl.SSLError) as e:
            self.close_connection = True
            if self._status is None:
                self._status = 0
            self.log_message("connection error: %r", e)
        except Exception as e:  # a bug in the emulator: report it loudly, keep serving
            log(traceback.format_exc().rstrip())
            self.close_connection = True
            if self._status is None:
                try:
                    self._err(500, "InternalServerError", f"emulator bug: {e!r}")
                except OSError:
                    pass
        finally:
            if not control:
                entry = {"t": round(t0, 6), "method": self.command, "path": self.path,
                         "endpoint": self._endpoint, "table": self._table, "namespace": self._namespace,
                         "status": self._status if self._status is not None else 0,
                         "headers": dict(self.headers.items()),
                         "server": "objects" if getattr(self.server, "objects_only", False) else "api",
                         "rate_limited": self._rate_limited}
                if self._fault:
                    entry["fault"] = self._fault
                self.emu.record(entry)
            if not self.emu.quiet:
                extra = (" [rate-limited]" if self._rate_limited else "") + \
                        (f" [fault {self._fault}]" if self._fault else "")
                log("cd2emu: %s %s %s -> %s %s %.3fs%s" % (
                    self.client_address[0], self.command, self.path, self._status,
                    self._endpoint or "", time.time() - t0, extra))

    def _route(self, method: str, path: str):
        """-> (endpoint, params, allowed methods) ; endpoint None = no such path."""
        parts = [unquote(p) for p in path.split("/")[1:]]
        if parts == ["ids", "auth", "login"]:
            return "login", {}, ("POST",)
        # /dap/query/{ns}/...: the namespace is checked after authentication (unknown: 404)
        if len(parts) == 4 and parts[:2] == ["dap", "query"] and parts[2] and parts[3] == "table":
            return "list_tables", {"namespace": parts[2]}, ("GET",)
        if len(parts) == 6 and parts[:2] == ["dap", "query"] and parts[2] and parts[3] == "table" \
                and parts[4] and parts[5] in ("schema", "data"):
            if parts[5] == "schema":
                return "schema", {"namespace": parts[2], "table": parts[4]}, ("GET",)
            return "create_job", {"namespace": parts[2], "table": parts[4]}, ("POST",)
        if len(parts) == 3 and parts[:2] == ["dap", "job"]:
            return "get_job", {"job_id": parts[2]}, ("GET",)
        if parts == ["dap", "object", "url"]:
            return "object_urls", {}, ("POST",)
        if len(parts) >= 2 and parts[0] == "_obj":
            return "download", {"token": path[len("/_obj/"):]}, ("GET", "HEAD")
        return None, {}, ()

    def _bearer(self):
        auth = self.headers.get("Authorization") or ""
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip()
        return (self.headers.get("x-instauth") or "").strip() or None

    def _basic(self):
        auth = self.headers.get("Authorization") or ""
        if auth[:6].lower() != "basic ":
            return None, None
        try:
            raw = base64.b64decode(auth[6:].strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return None, None
        if ":" not in raw:
            return None, None
        cid, secret = raw.split(":", 1)  # client ids contain '#', never ':'; secrets may contain ':'
        return cid, secret

    def _json_body(self):
        try:
            return json.loads(self._body.decode("utf-8")) if self._body.strip() else None
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"body is not valid JSON: {e}")

    # -- DAP API ---------------------------------------------------------------------------------
    def _api(self, path: str):
        emu = self.emu
        endpoint, params, methods = self._route(self.command, path)
        if endpoint is None:
            self._err(404, "NotFound", f"no such resource: {path}", id=path, kind="resource")
            return
        self._endpoint = endpoint
        self._table = params.get("table")
        self._namespace = params.get("namespace")
        # with an objects host, objects are there only, and the API is not
        if emu.objects_base_url and (endpoint == "download") != getattr(self.server, "objects_only", False):
            self._err(404, "NotFound", f"no such resource on this host: {path}", id=path, kind="resource")
            return
        if self.command not in methods:
            self._err(405, "MethodNotAllowed", f"{self.command} not allowed on {path}",
                      headers={"Allow": ", ".join(methods)})
            return
        now = time.time()

        # 1. who is asking (without rejecting yet: faults come before auth, like a gateway)
        client_id, auth_problem, job, url_oid, url_expired = None, None, None, None, False
        with emu.lock:
            if endpoint == "login":
                client_id = self._basic()[0]
            elif endpoint == "download":
                url_oid, url_expired = emu.parse_url_token(params["token"])
                job = emu.jobs.by_object.get(url_oid) if url_oid else None
                client_id = job.client_id if job else None
            else:
                client_id, auth_problem = emu.tokens.resolve(self._bearer(), now)
                if endpoint == "get_job":
                    j = emu.jobs.by_id.get(params["job_id"])
                    if j is not None and j.client_id == client_id:
                        job = j
                elif endpoint == "object_urls":
                    try:
                        ids = json.loads(self._body or b"null")
                        first = ids[0]["id"] if isinstance(ids, list) and ids and isinstance(ids[0], dict) else None
                    except (ValueError, UnicodeDecodeError, KeyError):
                        first = None
                    j = emu.jobs.by_object.get(first) if isinstance(first, str) else None
                    if j is not None and j.client_id == client_id:
                        job = j
            if job is not None:
                self._table = job.table
                self._namespace = job.namespace

        # 2. generic faults
        with emu.lock:
            rule = emu.faults.take(endpoint, self._table, client_id, GENERIC_KINDS, namespace=self._namespace)
        if rule is not None:
            self._fault = rule["kind"]
            kind = rule["kind"]
            if kind == "hang":
                time.sleep(float(rule["seconds"]))
                now = time.time()
            elif kind == "reset":
                self._rst()
            elif kind == "status":
                st = rule["status"]
                headers = {"Retry-After": rule["retry_after"]} if rule.get("retry_after") else None
                etype = rule.get("error_type") or DEFAULT_ERROR_TYPES.get(st, "Error")
                extra = {"id": path, "kind": "resource"} if etype == "NotFound" else {}
                self._err(st, etype, rule.get("message") or f"injected fault: HTTP {st}", headers=headers,
                          **extra)
                return
            elif kind == "revoke_tokens":
                with emu.lock:
                    emu.tokens.revoke(rule.get("client_id") or client_id)
                self._err(401, "AuthenticationError", "access token revoked",
                          headers={"WWW-Authenticate": "Bearer"})
                return

        if endpoint == "login":
            return self._login(now)
        if endpoint == "download":
            return self._download(url_oid, url_expired, job, now)

        # 3. authentication
        with emu.lock:  # re-resolve: a hang may have outlived the token
            client_id, auth_problem = emu.tokens.resolve(self._bearer(), now)
        if auth_problem:
            self._err(401, "AuthenticationError", auth_problem, headers={"WWW-Authenticate": "Bearer"})
            return
        if self._namespace is not None and self._namespace not in NAMESPACES:
            self._err(404, "NotFound", f"namespace {self._namespace} not found", id=path, kind="resource")
            return

        # 4. rate limits (per credential and endpoint, across namespaces)
        with emu.lock:
            wait = emu.limiter.check(emu.config["rate_limits"], client_id, endpoint, now)
            send_retry_after = emu.config["retry_after"]
        if wait is not None:
            self._rate_limited = True
            self._err(429, "TooManyRequests", f"rate limit exceeded for {endpoint}",
                      headers={"Retry-After": str(wait)} if send_retry_after else None)
            return

        handler = {"list_tables": self._list_tables, "schema": self._schema,
                   "create_job": self._create_job, "get_job": self._get_job,
                   "object_urls": self._object_urls}[endpoint]
        try:
            handler(client_id, params, now)
        except BadRequest as e:
            self._err(400, "ValidationError", str(e))

    def _login(self, now):
        emu = self.emu
        cid, secret = self._basic()
        with emu.lock:
            inst = emu.store.instances.get(cid) if cid else None
            ok = inst is not None and hmac.compare_digest(inst["secret"].encode(), (secret or "").encode())
            lifetime = emu.config["token_lifetime"]
        if not ok:
            self._err(401, "AuthenticationError", "invalid client credentials",
                      headers={"WWW-Authenticate": 'Basic realm="dap"'})
            return
        form = parse_qs(self._body.decode("utf-8", "replace"), keep_blank_values=True)
        grant = form.get("grant_type", [None])[0]
        if grant != "client_credentials":
            self._err(400, "ValidationError", f"unsupported grant_type {grant!r}")
            return
        with emu.lock:
            token = emu.tokens.issue(cid, lifetime, now)
        inst_name = cid.split("#", 1)[-1]
        self._json(200, {"access_token": token, "expires_in": int(lifetime),
                         "scope": f"urn:canvas:instance:{inst_name} "
                                  + " ".join(f"dap:query:{ns}" for ns in NAMESPACES),
                         "token_type": "Bearer"})

    def _list_tables(self, client_id, params, now):
        with self.emu.lock:
            names = self.emu.store.table_names(client_id, params["namespace"])
        self._json(200, {"tables": names})

    def _schema(self, client_id, params, now):
        ns = params["namespace"]
        with self.emu.lock:
            t = self.emu.store.table(client_id, params["table"], ns) or \
                self.emu.store.bulk_table(client_id, params["table"], ns)
            body = {"version": t.version, "schema": copy.deepcopy(t.schema)} if t else None
        if body is None:
            self._err(404, "NotFound", f"table {params['table']} not found", id=params["table"], kind="table")
        else:
            self._json(200, body)

    def _create_job(self, client_id, params, now):
        emu = self.emu
        tname, ns = params["table"], params["namespace"]
        body = self._json_body()
        if not isinstance(body, dict):
            raise BadRequest("query body must be a JSON object")
        unknown = set(body) - {"format", "mode", "since", "until"}
        if unknown:
            raise BadRequest(f"unknown query fields {sorted(unknown)}")
        for k, v in body.items():
            if v is None:  # the docs say: omit absent optional fields
                raise BadRequest(f"{k} must not be null (omit absent fields)")
        fmt = body.get("format")
        with emu.lock:
            cfg = copy.deepcopy(emu.config)
            clock, bulk_clock = emu.store.clock, None
            table = emu.store.table(client_id, tname, ns)
            bulk = emu.store.bulk_table(client_id, tname, ns) if table is None else None
            if bulk is not None:
                clock = None  # its times are its own: BulkTable.result checks them
                bulk_clock = bulk.clock
        if table is None and bulk is None:
            self._err(404, "NotFound", f"table {tname} not found", id=tname, kind="table")
            return
        if fmt not in ALL_FORMATS:
            raise BadRequest(f"unknown format {fmt!r} (expected one of {', '.join(ALL_FORMATS)})")
        if fmt == "parquet" or fmt not in cfg["formats"]:
            raise BadRequest(f"format {fmt} is not supported by this server")
        if bulk is not None and fmt != bulk.fmt:
            raise BadRequest(f"format {fmt} is not available for table {tname} (its files are {bulk.fmt})")
        if "mode" in body and body["mode"] != "condensed":
            raise BadRequest(f"unsupported mode {body['mode']!r}")
        since = until = None
        if "since" in body:
            try:
                since = parse_ts(body["since"])
            except ValueError as e:
                raise BadRequest(f"since: {e}")
            if clock is not None and since > clock:
                raise BadRequest(f"since ({fmt_ts(since)}) is later than the latest data ({fmt_ts(clock)})")
        if "until" in body:
            if since is None:
                raise BadRequest("until needs since (snapshots take no until)")
            try:
                until = parse_ts(body["until"])
            except ValueError as e:
                raise BadRequest(f"until: {e}")
            if clock is not None and until > clock:
                raise BadRequest(f"until ({fmt_ts(until)}) is later than the latest data ({fmt_ts(clock)})")
            if until < since:
                raise BadRequest("until is earlier than since")
        # the earliest since served: earliest_since, and for canvas_logs the retention window
        earliest, etype, why = None, None, ""
        if cfg["earliest_since"]:
            earliest, etype = parse_ts(cfg["earliest_since"]), cfg["since_too_old_error"]
        if ns == LOG_NS:
            wstart = window_start(clock if bulk is None else bulk_clock, cfg["log_retention_days"])
            if wstart is not None and (earliest is None or wstart > earliest):
                earliest, etype = wstart, "OutOfRange"
                why = f" ({ns} keeps only the last {cfg['log_retention_days']:g} days)"
        if since is not None and earliest is not None and since < earliest:
            self._err(400, etype, f"since is earlier than {fmt_ts(earliest)}" + why
                      + ("; take a new snapshot" if etype == "SnapshotRequired" else ""),
                      since=fmt_ts(earliest))
            return

        # create_job faults
        with emu.lock:
            take = lambda kinds, pred=None: emu.faults.take("create_job", tname, client_id, kinds, pred,  # noqa
                                                            namespace=ns)
            tooold = take({"snapshot_required", "out_of_range"}, lambda r: since is not None)
            # the files of a bulk table are served as they are: only job_failed can shape its jobs
            shapers = ("job_failed",) if bulk is not None else ("malformed_record", "bad_value", "job_failed")
            mods = {} if tooold else {k: take({k}) for k in shapers}
        if tooold:
            self._fault = tooold["kind"]
            etype = "SnapshotRequired" if tooold["kind"] == "snapshot_required" else "OutOfRange"
            earliest = tooold.get("since") or cfg["earliest_since"] or fmt_ts(clock or bulk_clock)
            self._err(400, etype, tooold.get("message") or f"since is out of range; earliest is {earliest}",
                      since=earliest)
            return
        mods = {k: v for k, v in mods.items() if v is not None}
        if mods:
            self._fault = ",".join(sorted(mods))

        query = {k: body[k] for k in ("format", "mode", "since", "until") if k in body}
        dkey = (client_id, ns, tname, json.dumps(query, sort_keys=True))
        if bulk is not None:
            dkey += ("bulk", bulk.serial)  # a new registration never reuses an old job
        with emu.lock:
            job = None
            if cfg["dedupe_jobs"] and not mods:
                job = emu.jobs.find_dedupe(dkey, now)
            if job is None:
                if bulk is not None:
                    job = emu.create_bulk_job(client_id, bulk, since, until, failed=mods.get("job_failed"))
                else:
                    job = emu.create_job(client_id, table, query, malformed=mods.get("malformed_record"),
                                         bad_value=mods.get("bad_value"), failed=mods.get("job_failed"))
                # jobs shaped by a fault are never reused: a retry gets a clean job
                emu.jobs.add(job, dkey if (cfg["dedupe_jobs"] and not mods) else None)
            view = job.view(time.time())
        self._json(200, view)

    def _get_job(self, client_id, params, now):
        jid = params["job_id"]
        with self.emu.lock:
            job = self.emu.jobs.get(jid, now)
            view = job.view(now) if job is not None and job.client_id == client_id else None
        if view is None:
            self._err(404, "NotFound", f"job {jid} not found", id=jid, kind="job")
        else:
            self._json(200, view)

    def _object_urls(self, client_id, params, now):
        emu = self.emu
        body = self._json_body()
        if not isinstance(body, list) or not all(isinstance(x, dict) and isinstance(x.get("id"), str)
                                                 for x in body):
            raise BadRequest('body must be a list of {"id": "<object id>"}')
        with emu.lock:
            urls = {}
            for item in body:
                oid = item["id"]
                job = emu.jobs.by_object.get(oid)
                if job is None or job.client_id != client_id or job.status(now) != "complete":
                    return self._err(404, "NotFound", f"object {oid} not found", id=oid, kind="object")
                if job.is_gone(now):
                    return self._err(404, "NotFound", f"job {job.id} not found (expired)",
                                     id=job.id, kind="job")
                rule = emu.faults.take("object_urls", job.table, client_id, {"expire_job"},
                                       namespace=job.namespace)
                if rule is not None:
                    self._fault = "expire_job"
                    emu.jobs.expire(job)
                    return self._err(404, "NotFound", rule.get("message") or f"job {job.id} not found (expired)",
                                     id=job.id, kind="job")
                urls[oid] = {"url": emu.sign_url(oid, now)}
        self._json(200, {"urls": urls})

    def _download(self, oid, url_expired, job, now):
        emu = self.emu
        if oid is None:
            return self._xml_error(403, "AccessDenied", "The request signature we calculated does not match")
        if url_expired:
            return self._xml_error(403, "AccessDenied", "Request has expired")
        with emu.lock:
            if job is None or job.is_gone(now):
                # like S3 without ListBucket permission: a deleted object answers 403
                return self._xml_error(403, "AccessDenied", "Access Denied")
            data = job.files[oid]
            rule = emu.faults.take("download", job.table, job.client_id,
                                   {"expire_url", "reset_mid_body", "corrupt_gzip", "truncated_gzip"},
                                   namespace=job.namespace)
        kind = rule["kind"] if rule else None
        if kind:
            self._fault = kind
        if kind == "expire_url":
            return self._xml_error(403, "AccessDenied", "Request has expired")
        if isinstance(data, BulkFile):
            return self._stream_file(data, kind, job)
        if kind == "corrupt_gzip":
            b = bytearray(data)
            mid = len(b) // 2
            for i in range(max(0, mid - 8), min(len(b), mid + 8)):
                b[i] ^= 0xA5
            data = bytes(b)
        elif kind == "truncated_gzip":
            data = data[: len(data) // 2]

        total = len(data)
        status, body, headers = 200, data, {"Accept-Ranges": "bytes",
                                            "ETag": '"%s"' % hashlib.md5(data).hexdigest(),
                                            "Last-Modified": self.date_time_string(int(job.created))}
        rng = self._byte_range(total)
        if rng == "unsatisfiable":
            return self._send_416(total)
        if rng is not None:
            start, end = rng
            status, body = 206, data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        if kind == "reset_mid_body":
            # full Content-Length, about half of the body, then close (FIN; the client sees a
            # premature end of the body)
            self.close_connection = True
            self._status = status
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body[: len(body) // 2])
            self._close_write()
        self._send(status, body, "application/octet-stream", headers)

    def _byte_range(self, total: int):
        """The request's Range against a body of total bytes: None (whole body; also for a header
        we cannot parse), (start, end) inclusive, or "unsatisfiable"."""
        rng = (self.headers.get("Range") or "").strip()
        if not rng.startswith("bytes=") or "," in rng:
            return None
        a, _, b = rng[6:].partition("-")
        try:
            if a.strip():
                start = int(a)
                end = min(int(b), total - 1) if b.strip() else total - 1
            else:  # suffix range bytes=-N
                start, end = max(0, total - int(b)), total - 1
        except ValueError:
            return None  # unparsable: ignore the header
        if start >= total or end < start:
            return "unsatisfiable"
        return start, end

    def _send_416(self, total: int):
        self._send(416, s3_error_xml("InvalidRange", "The requested range is not satisfiable"),
                   "application/xml", {"Content-Range": f"bytes */{total}"})

    def _close_write(self):
        """End a response cut short: close the connection (FIN) and stop handling the request."""
        self.close_connection = True
        try:
            self.request.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        raise Abort()

    STREAM_CHUNK = 1 << 20

    def _stream_file(self, bf: BulkFile, kind, job):
        """Sends a bulk table's file from disk in chunks (never whole in memory), with Range and
        the download faults: truncated_gzip serves the first half as if it were the whole file,
        corrupt_gzip flips 16 bytes around the middle, reset_mid_body stops half way."""
        try:
            f = open(bf.path, "rb")
        except OSError as e:
            return self._err(500, "InternalServerError", f"bulk file unreadable: {e.strerror}")
        with f:
            st = os.fstat(f.fileno())
            size = st.st_size
            total = size // 2 if kind == "truncated_gzip" else size
            headers = {"Accept-Ranges": "bytes", "ETag": '"%x-%x"' % (size, st.st_mtime_ns),
                       "Last-Modified": self.date_time_string(int(job.created))}
            status, start, end = 200, 0, total - 1
            rng = self._byte_range(total)
            if rng == "unsatisfiable":
                return self._send_416(total)
            if rng is not None:
                status, (start, end) = 206, rng
                headers["Content-Range"] = f"bytes {start}-{end}/{total}"
            length = max(0, end - start + 1)
            if kind == "reset_mid_body":
                self.close_connection = True
            self._send(status, b"", "application/octet-stream", headers, length=length)
            if self.command == "HEAD":
                return
            limit = length // 2 if kind == "reset_mid_body" else length
            bad_lo, bad_hi = (max(0, size // 2 - 8), min(size, size // 2 + 8)) if kind == "corrupt_gzip" else (0, 0)
            f.seek(start)
            pos, sent = start, 0
            while sent < limit:
                chunk = f.read(min(self.STREAM_CHUNK, limit - sent))
                if not chunk:
                    break  # the file shrank since: the client sees a body cut short
                if pos < bad_hi and pos + len(chunk) > bad_lo:
                    b = bytearray(chunk)
                    for i in range(max(bad_lo, pos), min(bad_hi, pos + len(chunk))):
                        b[i - pos] ^= 0xA5
                    chunk = bytes(b)
                self.wfile.write(chunk)
                pos += len(chunk)
                sent += len(chunk)
            if sent < length:
                self._close_write()

    # -- control API -----------------------------------------------------------------------------
    def _control(self, path: str, query: str):
        emu = self.emu
        qs = {k: v[-1] for k, v in parse_qs(query).items()}
        m = self.command
        try:
            if path == "/_emu/health" and m == "GET":
                with emu.lock:
                    return self._json(200, {"ok": True, "clock": fmt_ts(emu.store.clock),
                                            "base_url": emu.base_url})
            if path == "/_emu/load" and m == "POST":
                body = self._json_body()
                if isinstance(body, dict) and "generate" in body:
                    gen = GENERATORS.get(body["generate"])
                    if gen is None:
                        raise BadRequest(f"unknown generator {body['generate']!r}")
                    body = gen()
                emu.load(body)
                with emu.lock:
                    return self._json(200, {"ok": True, "at": fmt_ts(emu.store.clock),
                                            "instances": sorted(emu.store.instances)})
            if path == "/_emu/reset" and m == "POST":
                emu.reset()
                return self._json(200, {"ok": True})
            if path == "/_emu/epoch" and m == "POST":
                body = self._json_body()
                with emu.lock:
                    at = emu.store.apply_epoch(body if body is not None else {})
                return self._json(200, {"at": fmt_ts(at)})
            if path == "/_emu/state" and m == "GET":
                return self._state(qs)
            if path == "/_emu/bulk":
                with emu.lock:
                    if m == "POST":
                        return self._json(200, emu.store.register_bulk(self._json_body()))
                    if m == "GET":
                        return self._json(200, [t.summary(cid) for cid, inst in sorted(emu.store.instances.items())
                                                for _n, t in sorted(inst["bulk"].items())])
                    if m == "DELETE":
                        if not emu.store.drop_bulk(qs.get("client_id"), qs.get("table"), qs.get("namespace")):
                            raise BadRequest("no such bulk table (give client_id and table)")
                        return self._json(200, {"ok": True})
            if path == "/_emu/faults":
                with emu.lock:
                    if m == "POST":
                        body = self._json_body()
                        rules = body.get("faults") if isinstance(body, dict) else body
                        n = emu.faults.add(rules)
                        return self._json(200, {"added": n, "faults": emu.faults.rules})
                    if m == "DELETE":
                        emu.faults.rules.clear()
                        return self._json(200, {"faults": []})
                    if m == "GET":
                        return self._json(200, {"faults": emu.faults.rules, "fired": emu.faults.fired})
            if path == "/_emu/config":
                if m == "POST":
                    return self._json(200, emu.set_config(self._json_body() or {}))
                if m == "GET":
                    with emu.lock:
                        return self._json(200, emu.config)
            if path == "/_emu/requests":
                with emu.lock:
                    if m == "GET":
                        return self._json(200, emu.requests)
                    if m == "DELETE":
                        emu.requests = []
                        emu.stats = emu._empty_stats()
                        return self._json(200, {"ok": True})
            if path == "/_emu/stats":
                with emu.lock:
                    if m == "GET":
                        return self._json(200, emu.stats)
                    if m == "DELETE":
                        emu.stats = emu._empty_stats()
                        return self._json(200, {"ok": True})
            if path == "/_emu/revoke" and m == "POST":
                body = self._json_body()
                if not isinstance(body, dict) or not isinstance(body.get("client_id"), str):
                    raise BadRequest('body must be {"client_id": ...}')
                with emu.lock:
                    return self._json(200, {"revoked": emu.tokens.revoke(body["client_id"])})
            if path == "/_emu/jobs" and m == "GET":
                # optional filters: client_id, table ("t" = canvas, or "ns.t"), namespace
                want_ns, want_t = qs.get("namespace"), None
                if qs.get("table"):
                    want_ns, want_t = split_table(qs["table"], want_ns)
                elif want_ns is not None and want_ns not in NAMESPACES:
                    raise BadRequest(f"unknown namespace {want_ns!r}")
                now = time.time()
                with emu.lock:
                    return self._json(200, [
                        dict(j.view(now), client_id=j.client_id, table=j.table, namespace=j.namespace,
                             gone=j.is_gone(now)) for j in emu.jobs.by_id.values()
                        if (qs.get("client_id") is None or j.client_id == qs["client_id"])
                        and (want_ns is None or j.namespace == want_ns)
                        and (want_t is None or j.table == want_t)])
            self._err(404, "NotFound", f"no control endpoint {m} {path}", id=path, kind="resource")
        except BadRequest as e:
            self._err(400, "ValidationError", str(e))

    def _state(self, qs):
        """Expected state. `table` is "t" (canvas) or "ns.t" (or `namespace` + "t"). A canvas_logs
        table gives every row the store holds, or with window=1 only the rows whose timestamp is
        in the retention window (what a fresh snapshot holds)."""
        emu = self.emu
        cid = qs.get("client_id")
        fresh = qs.get("fresh", "") in ("1", "true", "yes")
        window = qs.get("window", "") in ("1", "true", "yes")
        with emu.lock:
            inst = emu.store.instances.get(cid)
            if inst is None:
                raise BadRequest(f"unknown client_id {cid!r}")
            at = fmt_ts(emu.store.clock)
            days = emu.config["log_retention_days"]

            def one(t):
                w = emu.store.log_window(t, days) if window else None
                d = {"version": t.version, "schema": copy.deepcopy(t.schema),
                     "rows": emu.store.expected_rows(t, fresh, w)}
                if w is not None:
                    d["window_start"] = fmt_ts(w)
                return d

            if qs.get("table"):
                ns, bare = split_table(qs["table"], qs.get("namespace"))
                name = qualify(ns, bare)
                t = inst["tables"].get(name)
                if t is None and name in inst["bulk"]:
                    raise BadRequest(f"table {name!r} is a bulk table: the emulator keeps no rows of it")
                if t is None:
                    raise BadRequest(f"unknown table {name!r}")
                return self._json(200, dict({"at": at}, **one(t)))
            ns = qs.get("namespace")
            if ns is not None and ns not in NAMESPACES:
                raise BadRequest(f"unknown namespace {ns!r}")
            return self._json(200, {"at": at, "tables": {
                name: one(t) for name, t in sorted(inst["tables"].items()) if ns is None or t.namespace == ns}})


class EmuServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # never wait for idle keep-alive connections when stopping
    allow_reuse_address = True
    request_queue_size = 256

    def server_bind(self):
        socketserver.TCPServer.server_bind(self)  # skip HTTPServer's slow getfqdn()
        host, port = self.server_address[:2]
        self.server_name, self.server_port = host, port

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, ssl.SSLError, OSError)):
            return
        super().handle_error(request, client_address)


def make_server(port=0, scenario=None, tls_cert=None, tls_key=None, quiet=True, host="127.0.0.1"):
    """Create (not start) a server; `server.emu` is its Emulator. Call serve_forever() to run."""
    server = EmuServer((host, port), Handler)
    scheme = "http"
    if tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tls_cert, tls_key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        scheme = "https"
    server.emu = Emulator(scenario, quiet=quiet)
    server.emu.base_url = f"{scheme}://127.0.0.1:{server.server_address[1]}"
    return server


# ----------------------------------------------------------------------------------------------
# demo scenario
# ----------------------------------------------------------------------------------------------

def _p(type_, desc, fmt=None, **extra):
    d = {"type": type_, "description": desc}
    if fmt:
        d["format"] = fmt
    d.update(extra)
    return d


def _cd2_schema(title, desc, value_props, required, key_id=None):
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": title,
        "description": desc,
        "type": "object",
        "properties": {
            "key": {"type": "object", "description": "Primary key.",
                    "properties": {"id": key_id or _p("integer", f"The unique identifier of the {title[:-1]} record.",
                                                      "int64")},
                    "required": ["id"], "additionalProperties": False},
            "value": {"type": "object", "properties": value_props, "required": required,
                      "additionalProperties": False},
            "meta": {"type": "object",
                     "properties": {"ts": _p("string", "Commit time of the latest change of the record.",
                                             "date-time"),
                                    "action": _p("string", "U = insert or update, D = delete.",
                                                 enum=["U", "D"])},
                     "required": ["ts"], "additionalProperties": False},
        },
        "required": ["key", "meta"],
        "additionalProperties": False,
    }


TS = lambda d: _p("string", d, "date-time")  # noqa: E731
I64 = lambda d: _p("integer", d, "int64")  # noqa: E731
I32 = lambda d: _p("integer", d, "int32")  # noqa: E731

DEMO_SCHEMAS = {
    "accounts": _cd2_schema("accounts", "Accounts are the administrative units of a Canvas instance.", {
        "name": _p("string", "Name of the account.", maxLength=255),
        "workflow_state": _p("string", "Life-cycle state of the account.", enum=["active", "deleted", "suspended"]),
        "parent_account_id": I64("The account this sub-account belongs to."),
        "root_account_id": I64("The root account of this account."),
        "default_time_zone": _p("string", "Default time zone of the account."),
        "sis_source_id": _p("string", "SIS identifier."),
        "settings": _p("object", "Account settings (serialized hash)."),
        "created_at": TS("Timestamp of creation."),
        "updated_at": TS("Timestamp of the last update."),
    }, ["name", "workflow_state", "created_at", "updated_at"]),
    "users": _cd2_schema("users", "Users of the Canvas instance.", {
        "name": _p("string", "Full name of the user."),
        "sortable_name": _p("string", "Name used for sorting (Last, First)."),
        "short_name": _p("string", "Display name."),
        "workflow_state": _p("string", "Life-cycle state of the user.",
                             enum=["registered", "pre_registered", "creation_pending", "deleted"]),
        "deleted_at": TS("Timestamp when the user was deleted."),
        "merged_into_user_id": I64("The user this user was merged into, if any."),
        "uuid": _p("string", "Public unique identifier.", "uuid"),
        "time_zone": _p("string", "Preferred time zone."),
        "locale": _p("string", "Preferred locale."),
        "preferences": _p("object", "User preferences (serialized hash)."),
        "avatar_image_url": _p("string", "URL of the avatar image.", maxLength=255),
        "created_at": TS("Timestamp of creation."),
        "updated_at": TS("Timestamp of the last update."),
    }, ["workflow_state", "created_at", "updated_at"]),
    "courses": _cd2_schema("courses", "Courses taught in the Canvas instance.", {
        "name": _p("string", "Full name of the course."),
        "course_code": _p("string", "Short code of the course.", maxLength=255),
        "workflow_state": _p("string", "Life-cycle state of the course.",
                             enum=["created", "claimed", "available", "completed", "deleted"]),
        "account_id": I64("The account the course belongs to."),
        "root_account_id": I64("The root account of the course."),
        "enrollment_term_id": I64("The term of the course."),
        "is_public": _p("boolean", "Whether the course is public."),
        "syllabus_body": _p("string", "HTML body of the syllabus."),
        "default_view": _p("string", "Landing page of the course.",
                           enum=["feed", "wiki", "modules", "syllabus", "assignments"]),
        "storage_quota": I64("Storage quota in bytes."),
        "tags": {"type": "array", "items": {"type": "string"}, "description": "Free-form tags of the course."},
        "start_at": TS("Start of the course."),
        "conclude_at": TS("End of the course."),
        "created_at": TS("Timestamp of creation."),
        "updated_at": TS("Timestamp of the last update."),
    }, ["name", "workflow_state", "account_id", "root_account_id", "created_at", "updated_at"]),
    "enrollments": _cd2_schema("enrollments", "Enrollments of users in course sections.", {
        "user_id": I64("The enrolled user."),
        "course_id": I64("The course."),
        "course_section_id": I64("The course section."),
        "sis_pseudonym_id": I64("The pseudonym the SIS import used, if any."),
        "type": _p("string", "Kind of enrollment.",
                   enum=["StudentEnrollment", "TeacherEnrollment", "TaEnrollment", "ObserverEnrollment",
                         "DesignerEnrollment", "StudentViewEnrollment"]),
        "workflow_state": _p("string", "Life-cycle state of the enrollment.",
                             enum=["active", "invited", "creation_pending", "deleted", "rejected",
                                   "completed", "inactive"]),
        "role_id": I64("The role of the enrollment."),
        "root_account_id": I64("The root account."),
        "limit_privileges_to_course_section": _p("boolean", "Whether the user only sees their section."),
        "total_activity_time": I32("Total activity time in seconds."),
        "last_activity_at": TS("Last activity in the course."),
        "start_at": TS("Start of the enrollment."),
        "end_at": TS("End of the enrollment."),
        "created_at": TS("Timestamp of creation."),
        "updated_at": TS("Timestamp of the last update."),
    }, ["user_id", "course_id", "course_section_id", "type", "workflow_state", "role_id",
        "root_account_id", "created_at", "updated_at"]),
    "submissions": _cd2_schema("submissions", "Submissions of students for assignments.", {
        "assignment_id": I64("The assignment."),
        "user_id": I64("The submitting user."),
        "grader_id": I64("The user who graded the submission."),
        "score": _p("number", "Score of the submission.", "float64"),
        "points_deducted": _p("number", "Points deducted by a late policy.", "float32"),
        "grade": _p("string", "Grade as shown to the student."),
        "workflow_state": _p("string", "Life-cycle state of the submission.",
                             enum=["submitted", "unsubmitted", "graded", "pending_review", "deleted"]),
        "submission_type": _p("string", "How the work was submitted.",
                              enum=["online_text_entry", "online_upload", "online_url", "media_recording",
                                    "online_quiz", "discussion_topic"]),
        "body": _p("string", "Text of an online text entry."),
        "attempt": I32("Attempt number."),
        "extra_attempts": _p("integer", "Extra attempts granted.", "int16"),
        "excused": _p("boolean", "Whether the submission is excused."),
        "submitted_at": TS("Time of submission."),
        "graded_at": TS("Time of grading."),
        "created_at": TS("Timestamp of creation."),
        "updated_at": TS("Timestamp of the last update."),
    }, ["assignment_id", "user_id", "workflow_state", "created_at", "updated_at"]),
    "pseudonyms": _cd2_schema("pseudonyms", "Logins of users.", {
        "user_id": I64("The user of this login."),
        "account_id": I64("The account of this login."),
        "unique_id": _p("string", "The login name.", maxLength=255),
        "sis_user_id": _p("string", "SIS identifier of the user."),
        "integration_id": _p("string", "Integration identifier."),
        "workflow_state": _p("string", "Life-cycle state of the login.", enum=["active", "deleted", "suspended"]),
        "login_count": I32("Number of logins."),
        "last_login_at": TS("Time of the last login."),
        "authentication_provider_id": I64("Authentication provider."),
        "created_at": TS("Timestamp of creation."),
        "updated_at": TS("Timestamp of the last update."),
    }, ["user_id", "account_id", "unique_id", "workflow_state", "login_count", "created_at", "updated_at"]),
}

# -- the other namespaces (keys are qualified table names, as in a scenario) --------------------

HTTP_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]
UUID_STR = lambda d: _p("string", d, "uuid")  # noqa: E731
F64 = lambda d: _p("number", d, "float64")  # noqa: E731

DEMO_NS_SCHEMAS = {
    "canvas_logs.web_logs": _cd2_schema("web_logs", "Requests made to the Canvas web application (access logs). "
                                        "Only the last 30 days are available.", {
        "timestamp": TS("Time the request was made, in UTC."),
        "timestamp_year": _p("string", "Year of the request (YYYY, UTC)."),
        "timestamp_month": _p("string", "Month of the request (YYYY-MM, UTC)."),
        "timestamp_day": _p("string", "Day of the request (YYYY-MM-DD, UTC)."),
        "user_id": I64("The user who made the request (canvas.users; may be a user of another "
                       "institution, absent from users)."),
        "real_user_id": I64("The real user when the request was made by a user masquerading as user_id."),
        "course_id": I64("The course the request belongs to (canvas.courses)."),
        "quiz_id": I64("The quiz of the request (canvas.quizzes), if any."),
        "discussion_id": I64("The discussion topic of the request (canvas.discussion_topics), if any."),
        "conversation_id": I64("The conversation of the request (canvas.conversations), if any."),
        "assignment_id": I64("The assignment of the request (canvas.assignments), if any."),
        "url": _p("string", "Path and query string of the requested URL."),
        "http_method": _p("string", "HTTP method of the request.", enum=HTTP_METHODS),
        "http_status": _p("string", "HTTP status code of the response.", maxLength=3),
        "http_version": _p("string", "HTTP protocol version of the request."),
        "remote_ip": _p("string", "IP address of the client (IPv4 or IPv6)."),
        "interaction_micros": I64("Time spent handling the request, in microseconds."),
        "web_application_controller": _p("string", "Rails controller that handled the request."),
        "web_application_action": _p("string", "Rails action that handled the request."),
        "web_application_context_type": _p("string", "Type of the context of the request.",
                                           enum=["Course", "User", "Account", "Group"]),
        "web_application_context_id": I64("The context of the request (of web_application_context_type)."),
        "user_agent": _p("string", "User-Agent header of the request."),
        "session_id": UUID_STR("The session of the request."),
        "request_id": UUID_STR("The unique identifier Canvas gave the request."),
        "developer_key_id": I64("Developer key of the API client that made the request, if any."),
        "participated": _p("boolean", "Whether the request counts as participation (e.g. a submission)."),
        "account_id": I64("The root account of the request."),
    }, ["timestamp", "timestamp_year", "timestamp_month", "timestamp_day", "url", "http_method", "http_status",
        "request_id", "participated", "account_id"],
        key_id=UUID_STR("The unique identifier of the logged web request.")),
    "new_quizzes.quizzes": _cd2_schema("quizzes", "Quizzes of New Quizzes (Quizzes.Next).", {
        "title": _p("string", "Title of the quiz.", maxLength=255),
        "instructions": _p("string", "HTML instructions shown before the quiz."),
        "quiz_type": _p("string", "Kind of quiz.",
                        enum=["graded_quiz", "practice_quiz", "graded_survey", "ungraded_survey"]),
        "points_possible": F64("Maximum score of the quiz."),
        "context_id": I64("The Canvas course of the quiz (canvas.courses)."),
        "assignment_id": I64("The Canvas assignment that carries the quiz (canvas.assignments)."),
        "shuffle_answers": _p("boolean", "Whether answers are shown in random order."),
        "time_limit_seconds": I32("Time limit of an attempt in seconds, if any."),
        "allowed_attempts": I32("Number of attempts allowed (-1 = unlimited)."),
        "settings": _p("object", "Further quiz settings (serialized hash)."),
        "workflow_state": _p("string", "Life-cycle state of the quiz.", enum=["active", "unpublished", "deleted"]),
        "created_at": TS("Timestamp of creation."),
        "updated_at": TS("Timestamp of the last update."),
    }, ["title", "quiz_type", "context_id", "workflow_state", "created_at", "updated_at"]),
    "new_quizzes.quiz_sessions": _cd2_schema("quiz_sessions", "Attempts of users at New Quizzes.", {
        "quiz_id": I64("The quiz (new_quizzes.quizzes)."),
        "user_id": I64("The Canvas user taking the quiz (canvas.users)."),
        "attempt": I32("Attempt number."),
        "score": F64("Score of the attempt."),
        "points_possible": F64("Maximum score at the time of the attempt."),
        "status": _p("string", "State of the session.",
                     enum=["not_started", "in_progress", "submitted", "graded", "abandoned"]),
        "started_at": TS("Time the attempt was started."),
        "submitted_at": TS("Time the attempt was submitted."),
        "created_at": TS("Timestamp of creation."),
        "updated_at": TS("Timestamp of the last update."),
    }, ["quiz_id", "user_id", "attempt", "status", "created_at", "updated_at"]),
    "catalog.products": _cd2_schema("products", "Courses and programs offered in Catalog.", {
        "title": _p("string", "Title of the product.", maxLength=255),
        "description": _p("string", "HTML description of the product."),
        "type": _p("string", "Kind of product.", enum=["course", "program"]),
        "price": F64("Price of the product (0 = free)."),
        "currency": _p("string", "ISO 4217 currency of the price.", maxLength=3),
        "visibility": _p("string", "Whether the product is listed in the catalog.",
                         enum=["listed", "unlisted", "hidden"]),
        "canvas_course_id": I64("The Canvas course of a course product (canvas.courses)."),
        "enrollment_open": _p("boolean", "Whether users can enroll."),
        "start_date": _p("string", "First day of the product.", "date"),
        "end_date": _p("string", "Last day of the product.", "date"),
        "created_at": TS("Timestamp of creation."),
        "updated_at": TS("Timestamp of the last update."),
    }, ["title", "type", "price", "currency", "visibility", "created_at", "updated_at"]),
    "catalog.users": _cd2_schema("users", "Users registered in Catalog (not the Canvas users).", {
        "canvas_user_id": I64("The Canvas user of this Catalog user (canvas.users), once created."),
        "email": _p("string", "Email address used to register.", maxLength=255),
        "first_name": _p("string", "First name."),
        "last_name": _p("string", "Last name."),
        "created_at": TS("Timestamp of creation."),
        "updated_at": TS("Timestamp of the last update."),
    }, ["email", "created_at", "updated_at"]),
    "catalog.enrollments": _cd2_schema("enrollments", "Enrollments of Catalog users in products.", {
        "product_id": I64("The product (catalog.products)."),
        "user_id": I64("The Catalog user (catalog.users, not canvas.users)."),
        "root_program_id": I64("The program (a catalog.products row of type program) the enrollment came "
                               "through, if any."),
        "status": _p("string", "State of the enrollment.",
                     enum=["pending", "active", "completed", "cancelled", "expired"]),
        "created_at": TS("Timestamp of creation."),
        "updated_at": TS("Timestamp of the last update."),
    }, ["product_id", "user_id", "status", "created_at", "updated_at"]),
}

USER_AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0.0.0 "
    "Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 "
    "Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:132.0) Gecko/20100101 Firefox/132.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0.0.0 "
    "Safari/537.36 Edg/130.0.0.0",
    "candroid/7.9.0 (460) Dalvik/2.1.0 (Linux; U; Android 14; Pixel 8 Build/AP2A.240905.003)",
    "iCanvas/7.12 (com.instructure.icanvas; build:2342; iOS 18.1.1) Alamofire/5.9.1",
    "python-requests/2.32.3",
    'Mozilla/5.0 (compatible; "Campus Analytics" crawler/1.0; +https://example.invalid/bot, ops@example.invalid)',
    "curl/8.5.0",
]
# (method, url template, controller, action, context type)
LOG_ROUTES = [
    ("GET", "/courses/{course}", "courses", "show", "Course"),
    ("GET", "/courses/{course}/assignments/{assignment}", "assignments", "show", "Course"),
    ("POST", "/courses/{course}/assignments/{assignment}/submissions", "submissions", "create", "Course"),
    ("GET", "/courses/{course}/quizzes/{quiz}/take?user_id={user}", "quizzes/quizzes", "show", "Course"),
    ("POST", "/courses/{course}/quizzes/{quiz}/submissions?user_id={user}", "quizzes/quiz_submissions", "create",
     "Course"),
    ("GET", "/courses/{course}/discussion_topics/{discussion}", "discussion_topics", "show", "Course"),
    ("POST", "/api/v1/courses/{course}/discussion_topics/{discussion}/entries", "discussion_topics_api",
     "add_entry", "Course"),
    ("GET", "/conversations/{conversation}", "conversations", "show", "User"),
    ("DELETE", "/api/v1/conversations/{conversation}", "conversations", "destroy", "User"),
    ("GET", "/api/v1/courses/{course}/modules?include[]=items&include[]=content_details&per_page=50",
     "context_modules_api", "index", "Course"),
    ("PUT", "/api/v1/courses/{course}/assignments/{assignment}", "assignments_api", "update", "Course"),
    ("PATCH", "/api/v1/users/self/settings?manual_mark_as_read=true", "users", "settings", "User"),
    ("GET", "/api/v1/users/self/activity_stream?only_active_courses=true", "users", "activity_stream", "User"),
    ("GET", "/api/v1/courses/{course}/users?enrollment_type[]=student&search_term=O%27Brien,+Jr.&per_page=100",
     "courses", "users", "Course"),
    ("GET", "/courses/{course}/files/{file}/download?download_frd=1&verifier=Xy%2Fz9q", "files", "show", "Course"),
    ("POST", "/api/graphql", "graphql", "execute", None),
    ("GET", "/", "users", "user_dashboard", None),
    ("GET", "/login/canvas", "login/canvas", "new", None),
    ("HEAD", "/health_check", "info", "health_check", None),
]
ANONYMOUS_ROUTES = {"/login/canvas", "/health_check"}


def _demo_other_namespaces(rng: random.Random, scale: int, n_inst: int, base: int, start: datetime,
                           user_ids: list, course_ids: list, assignment_ids: list, root: int) -> dict:
    """Tables of canvas_logs, new_quizzes and catalog for one demo instance: {qualified name: rows}.
    Uses its own random generator, so the canvas tables stay as they were."""
    def n(k):
        return max(3, int(k * scale))

    def uid4():
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    def when(lo: datetime, hi: datetime):
        t = lo + timedelta(seconds=rng.randrange(max(1, int((hi - lo).total_seconds()))))
        if rng.random() < 0.3:
            t = t.replace(microsecond=rng.randrange(1000) * 1000)
        return t

    def row(key, value):
        return {"key": {"id": key}, "value": {k: v for k, v in value.items() if v is not None}}

    out = {}
    # canvas_logs.web_logs: spread over the 40 days before start (the API serves the last 30)
    logs = []
    window = 40 * 86400 * 10 ** 6
    sessions = [uid4() for _ in range(max(5, n(300) // 8))]
    for _ in range(n(300 if n_inst == 0 else 260)):
        t = start - timedelta(microseconds=rng.randrange(1, window))
        if rng.random() < 0.3:
            t = t.replace(microsecond=0)
        method, tmpl, controller, action, ctx_type = rng.choice(LOG_ROUTES)
        path = tmpl.split("?", 1)[0]
        anonymous = path in ANONYMOUS_ROUTES
        if anonymous or rng.random() < 0.03:
            user = None
        elif rng.random() < 0.06:  # a user of another institution (absent from users)
            user = 90_000_000_000_000 + rng.randrange(1, 10 ** 6)
        else:
            user = rng.choice(user_ids)
        ids = {"course": rng.choice(course_ids), "assignment": rng.choice(assignment_ids),
               "quiz": base + 80000 + rng.randrange(40), "discussion": base + 85000 + rng.randrange(60),
               "conversation": base + 87000 + rng.randrange(200), "file": base + 88000 + rng.randrange(500),
               "user": user or rng.choice(user_ids)}
        url = tmpl.format(**ids)
        if method == "GET" and not anonymous and rng.random() < 0.1:
            url += ("&" if "?" in url else "?") + "page=" + str(rng.randrange(2, 9))
        status = ("200" if method == "HEAD" else
                  rng.choice(["302", "200"]) if anonymous or path == "/" else
                  rng.choice(["200"] * 14 + ["201", "204", "302", "304", "401", "404", "422", "500"]))
        if user is None and path.startswith("/api/"):
            status = "401"
        ctx_id = ids["course"] if ctx_type == "Course" else (user if ctx_type == "User" else None)
        logs.append(row(uid4(), {
            "timestamp": fmt_ts(t),
            "timestamp_year": t.strftime("%Y"),
            "timestamp_month": t.strftime("%Y-%m"),
            "timestamp_day": t.strftime("%Y-%m-%d"),
            "user_id": user,
            "real_user_id": rng.choice(user_ids[:10]) if user and rng.random() < 0.04 else None,
            "course_id": ids["course"] if "{course}" in tmpl else None,
            "quiz_id": ids["quiz"] if "{quiz}" in tmpl else None,
            "discussion_id": ids["discussion"] if "{discussion}" in tmpl else None,
            "conversation_id": ids["conversation"] if "{conversation}" in tmpl else None,
            "assignment_id": ids["assignment"] if "{assignment}" in tmpl else None,
            "url": url,
            "http_method": method,
            "http_status": status,
            "http_version": rng.choice(["HTTP/1.1", "HTTP/2.0", "HTTP/2.0"]),
            "remote_ip": rng.choice([f"203.0.113.{rng.randrange(1, 255)}", f"198.51.100.{rng.randrange(1, 255)}",
                                     f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
                                     f"2001:db8:{rng.randrange(65536):x}::{rng.randrange(1, 65536):x}"]),
            "interaction_micros": rng.randrange(800, 2_500_000),
            "web_application_controller": controller,
            "web_application_action": action,
            "web_application_context_type": ctx_type if ctx_id else None,
            "web_application_context_id": ctx_id,
            "user_agent": rng.choice(USER_AGENTS) if rng.random() < 0.97 else None,
            "session_id": None if path == "/health_check" else rng.choice(sessions),
            "request_id": uid4(),
            "developer_key_id": base + 170000 + rng.randrange(3) if path.startswith("/api/") and rng.random() < 0.4
            else None,
            "participated": method in ("POST", "PUT") and status in ("200", "201") and ctx_type == "Course",
            "account_id": root,
        }))
    out["canvas_logs.web_logs"] = logs

    # new_quizzes
    begin = start - timedelta(days=400)
    quizzes, quiz_points = [], {}
    for i in range(n(30 if n_inst == 0 else 24)):
        qid = base + 90000 + i
        c = when(begin, start - timedelta(days=2))
        qtype = rng.choice(["graded_quiz"] * 4 + ["practice_quiz", "graded_survey", "ungraded_survey"])
        points = None if qtype == "ungraded_survey" else rng.choice([5.0, 10.0, 12.5, 20.0, 100.0])
        quiz_points[qid] = points
        quizzes.append(row(qid, {
            "title": rng.choice(["Week 1 check-in", "Midterm", "Quiz: \"Vectors\", part 2", "Évaluation finale",
                                 "小テスト", "Lab safety", "Survey, end of term"]) + f" #{i + 1}",
            "instructions": rng.choice([None, "", "<p>Read carefully.</p>\n<p>No notes.</p>",
                                        "Answer all questions;\tcalculators allowed"]),
            "quiz_type": qtype,
            "points_possible": points,
            "context_id": rng.choice(course_ids),
            "assignment_id": rng.choice(assignment_ids) if qtype in ("graded_quiz", "graded_survey") else None,
            "shuffle_answers": rng.random() < 0.5,
            "time_limit_seconds": rng.choice([None, None, 900, 1800, 3600]),
            "allowed_attempts": rng.choice([1, 1, 2, 3, -1]),
            "settings": rng.choice([None, {}, {"one_at_a_time_type": "question", "allow_backtracking": False},
                                    {"calculator_type": "scientific",
                                     "result_view_settings": {"display_points": True}}]),
            "workflow_state": rng.choice(["active"] * 6 + ["unpublished", "deleted"]),
            "created_at": fmt_ts(c), "updated_at": fmt_ts(when(c, start)),
        }))
    out["new_quizzes.quizzes"] = quizzes
    sessions_rows = []
    for i in range(n(60 if n_inst == 0 else 50)):
        qid = rng.choice(list(quiz_points))
        status = rng.choice(["graded"] * 4 + ["submitted", "in_progress", "not_started", "abandoned"])
        c = when(begin, start - timedelta(hours=1))
        started = when(c, start) if status != "not_started" else None
        submitted = when(started, start) if status in ("graded", "submitted") else None
        points = quiz_points[qid]
        score = (round(rng.uniform(0, points), 2) if rng.random() < 0.9 else points) \
            if status == "graded" and points is not None else None
        sessions_rows.append(row(base + 95000 + i, {
            "quiz_id": qid,
            "user_id": rng.choice(user_ids),
            "attempt": rng.randrange(1, 4),
            "score": score,
            "points_possible": points,
            "status": status,
            "started_at": fmt_ts(started) if started else None,
            "submitted_at": fmt_ts(submitted) if submitted else None,
            "created_at": fmt_ts(c), "updated_at": fmt_ts(submitted or started or c),
        }))
    out["new_quizzes.quiz_sessions"] = sessions_rows

    # catalog
    products, programs = [], []
    for i in range(n(24 if n_inst == 0 else 16)):
        pid = base + 110000 + i
        ptype = "program" if i % 6 == 5 else "course"
        if ptype == "program":
            programs.append(pid)
        c = when(begin, start - timedelta(days=1))
        first_day = (c + timedelta(days=rng.randrange(0, 60))).date()
        products.append(row(pid, {
            "title": rng.choice(["Python for Everyone", "Leadership, Ethics & You", "Certificat \"Data\"",
                                 "Grundkurs Statistik", "Professional Writing"]) + f" {i + 1}",
            "description": rng.choice([None, "", "<p>Self-paced.</p>\n<ul><li>6 weeks</li></ul>"]),
            "type": ptype,
            "price": rng.choice([0.0, 49.0, 99.99, 150.0, 1250.5]),
            "currency": rng.choice(["USD", "USD", "EUR", "GBP"]),
            "visibility": rng.choice(["listed"] * 3 + ["unlisted", "hidden"]),
            "canvas_course_id": rng.choice(course_ids) if ptype == "course" else None,
            "enrollment_open": rng.random() < 0.7,
            "start_date": first_day.isoformat() if rng.random() < 0.8 else None,
            "end_date": (first_day + timedelta(days=rng.randrange(30, 200))).isoformat() if rng.random() < 0.6
            else None,
            "created_at": fmt_ts(c), "updated_at": fmt_ts(when(c, start)),
        }))
    out["catalog.products"] = products
    cat_users = []
    canvas_pool = list(user_ids)
    rng.shuffle(canvas_pool)
    for i in range(n(30 if n_inst == 0 else 20)):
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        c = when(begin, start - timedelta(days=1))
        cat_users.append(row(base + 120000 + i, {
            "canvas_user_id": canvas_pool[i % len(canvas_pool)] if rng.random() < 0.85 else None,
            "email": f"learner{i + 1}@example.invalid",
            "first_name": first, "last_name": last,
            "created_at": fmt_ts(c), "updated_at": fmt_ts(when(c, start)),
        }))
    out["catalog.users"] = cat_users
    cat_enr = []
    product_ids = [r["key"]["id"] for r in products]
    for i in range(n(40 if n_inst == 0 else 30)):
        c = when(begin, start - timedelta(hours=2))
        # keys deliberately in the same range as the canvas enrollments' (base + 30000 + i)
        cat_enr.append(row(base + 30000 + i, {
            "product_id": rng.choice(product_ids),
            "user_id": rng.choice(cat_users)["key"]["id"],
            "root_program_id": rng.choice(programs) if programs and rng.random() < 0.3 else None,
            "status": rng.choice(["active"] * 4 + ["pending", "completed", "cancelled", "expired"]),
            "created_at": fmt_ts(c), "updated_at": fmt_ts(when(c, start)),
        }))
    out["catalog.enrollments"] = cat_enr
    return out


FIRST_NAMES = ["Ana", "José", "Zoë", "Łukasz", "Søren", "Renée", "Ólafur", "Chloé", "Mateus", "Aiko",
               "王芳", "李雷", "Σοφία", "Иван", "Đặng", "Fatima", "Amélie", "Björn", "Çağlar", "Priya",
               "Kwame", "Siobhán", "Noah", "Emma", "Liam", "Olivia", "Maëlle", "Jürgen"]
LAST_NAMES = ["Smith", "Müller", "García", "O'Brien", "Nowak", "Þórsson", "van der Berg", "Dvořák",
              "Ødegaard", "Rossi", "佐藤", "Kim", "Singh", "Mbeki", "Østergaard", "Smith, Jr.",
              '"Doc" Holliday', "Nguyễn", "Kowalczyk", "Ахмедов"]
SYLLABI = [
    "<p>Welcome!</p>\n<p>Office hours:\tMon 10-12</p>",
    "Files live in C:\\Users\\teacher\\notes.txt\nSecond line\twith a tab",
    "",
    None,
    'Quotes "like this", commas, and a\r\nCRLF line break',
    "Unicode ✓ — naïve café 日本語 🎓",
    "A literal \\N is not NULL, and NULL is just text",
    "Trailing backslash \\",
]


def demo_scenario(scale: int = 1, seed: int = 2026) -> dict:
    """The built-in deterministic sample: two instances, each with six CD2-like canvas tables and
    tables of the namespaces canvas_logs, new_quizzes and catalog."""
    start = DEFAULT_START
    end = datetime(2026, 10, 31, tzinfo=UTC)
    begin = datetime(2019, 1, 1, tzinfo=UTC)
    instances = {}
    for n_inst, (cid, secret, shard, size) in enumerate([
            ("us-east-1#demo-north", "north-secret", 1, 1.0),
            ("us-east-1#demo-south", "south-secret", 2, 0.5)]):
        rng = random.Random(seed * 100 + n_inst)
        base = shard * 10_000_000_000_000

        def n(k):
            return max(3, int(k * size * scale))

        def ts(after=None):
            lo = after or begin
            t = lo + timedelta(seconds=rng.randrange(int((end - lo).total_seconds()) or 1))
            if rng.random() < 0.2:  # some timestamps carry milliseconds
                t = t.replace(microsecond=rng.randrange(1000) * 1000)
            return fmt_ts(t)

        def maybe(v, p=0.7):
            return v if rng.random() < p else None

        def row(i, value):
            return {"key": {"id": base + i}, "value": {k: v for k, v in value.items() if v is not None}}

        tables = {name: [] for name in DEMO_SCHEMAS}
        # accounts: a root and sub-accounts
        n_acc = n(10)
        root = base + 1
        for i in range(1, n_acc + 1):
            c = ts()
            tables["accounts"].append(row(i, {
                "name": "Demo North University" if n_inst == 0 and i == 1 else
                        ("Demo South College" if i == 1 else
                         rng.choice(["Faculty of Arts", "Faculté des Sciences", "Ingeniería", "Medicine",
                                     "Law & Society", "理学部", "Continuing Ed."]) + f" {i}"),
                "workflow_state": rng.choice(["active"] * 6 + ["deleted", "suspended"]) if i > 1 else "active",
                "parent_account_id": None if i == 1 else root,
                "root_account_id": None if i == 1 else root,
                "default_time_zone": rng.choice(["America/Denver", "Europe/Oslo", "Asia/Tokyo", None]),
                "sis_source_id": maybe(f"ACC-{i:04d}", 0.5),
                "settings": rng.choice([None, {}, {"restrict_student_future_view": {"value": True}},
                                        {"lock_all_announcements": {"value": False, "locked": True},
                                         "sis_syncing": {"value": True}}]),
                "created_at": c, "updated_at": ts(parse_ts(c)),
            }))
        account_ids = [base + i for i in range(1, n_acc + 1)]
        # users
        n_users = n(150)
        user_ids = [base + 1000 + i for i in range(n_users)]
        for idx, uid in enumerate(user_ids):
            first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
            if idx == 0:
                first, last = "Zoë 😀", "Ångström-Łukasiewicz"
            state = rng.choice(["registered"] * 8 + ["pre_registered", "creation_pending", "deleted"])
            c = ts()
            deleted_at = ts(parse_ts(c)) if state == "deleted" else None
            merged = rng.choice(user_ids[:idx]) if state == "deleted" and idx > 0 and rng.random() < 0.5 else None
            tables["users"].append({"key": {"id": uid}, "value": {k: v for k, v in {
                "name": f"{first} {last}",
                "sortable_name": f"{last}, {first}",
                "short_name": maybe(first, 0.8) if idx != 1 else "",
                "workflow_state": state,
                "deleted_at": deleted_at,
                "merged_into_user_id": merged,
                "uuid": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "time_zone": maybe(rng.choice(["America/Denver", "Europe/Oslo", "Asia/Tokyo"]), 0.6),
                "locale": maybe(rng.choice(["en", "fr", "nb", "ja", "pt-BR"]), 0.5),
                "preferences": rng.choice([None, {}, {"theme": "dark", "hide_dashcard_color_overlays": True},
                                           {"custom_colors": {"course_1": "#ff0000"}, "tags": ["a", "b"]}]),
                "avatar_image_url": maybe(f"https://example.invalid/avatars/{uid}.png", 0.3),
                "created_at": c, "updated_at": deleted_at or ts(parse_ts(c)),
            }.items() if v is not None}})
        # courses
        n_courses = n(25)
        course_ids = [base + 5000 + i for i in range(n_courses)]
        for idx, cid_ in enumerate(course_ids):
            c = ts()
            start_at = maybe(ts(parse_ts(c)), 0.7)
            tables["courses"].append({"key": {"id": cid_}, "value": {k: v for k, v in {
                "name": rng.choice(["Intro to Programming", "Linear Algebra", "Histoire de l'art",
                                    "Biología Celular", "日本語 I", "Data, Ethics & Society",
                                    "Tab\tin name"]) + f" ({idx + 1})",
                "course_code": f"C{idx + 1:03d}" if idx != 2 else "\\N",
                "workflow_state": rng.choice(["available"] * 5 + ["created", "claimed", "completed", "deleted"]),
                "account_id": rng.choice(account_ids),
                "root_account_id": root,
                "enrollment_term_id": base + 900 + rng.randrange(4),
                "is_public": rng.random() < 0.3,
                "syllabus_body": SYLLABI[idx % len(SYLLABI)],
                "default_view": rng.choice(["feed", "wiki", "modules", "syllabus", "assignments"]),
                "storage_quota": rng.choice([None, 524288000, 1073741824, 5368709120]),
                "tags": rng.choice([None, [], ["stem"], ["stem", "year-1"], ["langues", "débutant"]]),
                "start_at": start_at,
                "conclude_at": ts(parse_ts(start_at)) if start_at and rng.random() < 0.7 else None,
                "created_at": c, "updated_at": ts(parse_ts(c)),
            }.items() if v is not None}})
        # pseudonyms (one or two per user)
        pseudonyms_of = {}
        pid = base + 20000
        for uid in user_ids:
            for _ in range(1 if rng.random() < 0.85 else 2):
                pid += 1
                if len(tables["pseudonyms"]) >= n(160):
                    break
                pseudonyms_of.setdefault(uid, []).append(pid)
                c = ts()
                tables["pseudonyms"].append({"key": {"id": pid}, "value": {k: v for k, v in {
                    "user_id": uid,
                    "account_id": root,
                    "unique_id": f"user{pid % 100000}@example.edu",
                    "sis_user_id": maybe(f"S{pid % 1000000:06d}", 0.6),
                    "integration_id": maybe(f"int-{pid % 1000}", 0.2),
                    "workflow_state": rng.choice(["active"] * 8 + ["deleted", "suspended"]),
                    "login_count": rng.randrange(0, 500),
                    "last_login_at": maybe(ts(parse_ts(c)), 0.8),
                    "authentication_provider_id": maybe(base + 7, 0.3),
                    "created_at": c, "updated_at": ts(parse_ts(c)),
                }.items() if v is not None}})
        # enrollments
        teachers = []
        for i in range(n(320)):
            uid = rng.choice(user_ids)
            etype = rng.choice(["StudentEnrollment"] * 7 + ["TeacherEnrollment", "TaEnrollment",
                                                             "ObserverEnrollment", "DesignerEnrollment"])
            if etype == "TeacherEnrollment":
                teachers.append(uid)
            c = ts()
            tables["enrollments"].append(row(30000 + i, {
                "user_id": uid,
                "course_id": rng.choice(course_ids),
                "course_section_id": base + 40000 + rng.randrange(n_courses * 2),
                "sis_pseudonym_id": rng.choice(pseudonyms_of.get(uid, [None])) if rng.random() < 0.5 else None,
                "type": etype,
                "workflow_state": rng.choice(["active"] * 6 + ["invited", "completed", "deleted", "inactive"]),
                "role_id": base + 100 + ["StudentEnrollment", "TeacherEnrollment", "TaEnrollment",
                                         "ObserverEnrollment", "DesignerEnrollment"].index(etype),
                "root_account_id": root,
                "limit_privileges_to_course_section": rng.random() < 0.2,
                "total_activity_time": rng.randrange(0, 2_000_000),
                "last_activity_at": maybe(ts(parse_ts(c)), 0.6),
                "start_at": None, "end_at": None,
                "created_at": c, "updated_at": ts(parse_ts(c)),
            }))
        teachers = teachers or user_ids[:3]
        # submissions
        assignment_ids = [base + 60000 + i for i in range(n(40))]
        for i in range(n(400)):
            state = rng.choice(["graded"] * 4 + ["submitted", "unsubmitted", "pending_review", "deleted"])
            graded = state == "graded"
            score = rng.choice([0.0, 50, 87.5, 93.333333333, 100, 12.25]) if graded else None
            c = ts()
            sub_at = ts(parse_ts(c)) if state != "unsubmitted" else None
            stype = rng.choice(["online_text_entry", "online_upload", "online_url", "online_quiz"]) \
                if state != "unsubmitted" else None
            tables["submissions"].append(row(70000 + i, {
                "assignment_id": rng.choice(assignment_ids),
                "user_id": rng.choice(user_ids),
                "grader_id": rng.choice(teachers) if graded else None,
                "score": score,
                "points_deducted": rng.choice([None, None, 0.5, 2.0]),
                "grade": (f"{score:g}" if score is not None else None),
                "workflow_state": state,
                "submission_type": stype,
                "body": rng.choice(["My answer:\n1) yes\n2) no", "Voir pièce jointe.", "",
                                    "tab\tseparated\\and backslashed"]) if stype == "online_text_entry" else None,
                "attempt": rng.randrange(1, 4) if sub_at else None,
                "extra_attempts": rng.choice([None, 0, 1, 2]),
                "excused": rng.random() < 0.05,
                "submitted_at": sub_at,
                "graded_at": ts(parse_ts(sub_at)) if graded and sub_at else None,
                "created_at": c, "updated_at": ts(parse_ts(c)),
            }))
        instances[cid] = {"secret": secret, "tables": {
            name: {"version": 1, "schema": copy.deepcopy(DEMO_SCHEMAS[name]), "rows": tables[name]}
            for name in DEMO_SCHEMAS}}
        # the other namespaces: a random generator of their own, after the canvas tables
        other = _demo_other_namespaces(random.Random(f"{seed}:{n_inst}:namespaces"), scale, n_inst, base,
                                       parse_ts(start), user_ids, course_ids, assignment_ids, root)
        for name in DEMO_NS_SCHEMAS:
            instances[cid]["tables"][name] = {"version": 1, "schema": copy.deepcopy(DEMO_NS_SCHEMAS[name]),
                                              "rows": other[name]}
    return {"start": start, "instances": instances}


GENERATORS = {
    "demo": demo_scenario,
    "demo-large": lambda: demo_scenario(scale=20),
    "empty": lambda: {"start": DEFAULT_START, "instances": {}},
}


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def write_port_file(path: str, port: int):
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(f"{port}\n")
    os.replace(tmp, path)  # readers never see a partial file


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Local emulator of the Canvas Data 2 DAP Query API")
    ap.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 = any free port)")
    ap.add_argument("--port-file", help="write the actual port to this file (atomically)")
    ap.add_argument("--scenario", help="scenario JSON file to load")
    ap.add_argument("--generate", help="built-in scenario: " + ", ".join(GENERATORS))
    ap.add_argument("--dump", action="store_true", help="print the scenario JSON and exit")
    ap.add_argument("--tls-cert", help="PEM certificate: serve HTTPS")
    ap.add_argument("--tls-key", help="PEM private key for --tls-cert")
    ap.add_argument("--quiet", action="store_true", help="do not log requests to stderr")
    ap.add_argument("--objects-host", action="store_true",
                    help="serve objects from a second port, named localhost in presigned URLs (as "
                         "real ones name a storage host): the API port then serves no object")
    args = ap.parse_args(argv)
    if args.scenario and args.generate:
        ap.error("--scenario and --generate are exclusive")
    if bool(args.tls_cert) != bool(args.tls_key):
        ap.error("--tls-cert and --tls-key go together")
    scenario = None
    if args.scenario:
        with open(args.scenario, encoding="utf-8") as f:
            scenario = json.load(f)
    elif args.generate:
        if args.generate not in GENERATORS:
            ap.error(f"unknown generator {args.generate!r} (known: {', '.join(GENERATORS)})")
        scenario = GENERATORS[args.generate]()
    if args.dump:
        json.dump(scenario or GENERATORS["empty"](), sys.stdout, ensure_ascii=False, indent=1)
        sys.stdout.write("\n")
        return 0
    try:
        server = make_server(args.port, scenario, args.tls_cert, args.tls_key, quiet=args.quiet)
    except BadRequest as e:
        log(f"cd2emu: bad scenario: {e}")
        return 2
    port = server.server_address[1]
    servers = [server]
    if args.objects_host:
        objects = make_server(0, None, args.tls_cert, args.tls_key, quiet=args.quiet)
        objects.emu = server.emu
        objects.objects_only = True
        scheme = server.emu.base_url.split(":", 1)[0]
        server.emu.objects_base_url = f"{scheme}://localhost:{objects.server_address[1]}"
        servers.append(objects)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    except (AttributeError, ValueError):
        pass
    for srv in servers:
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    if args.port_file:
        write_port_file(args.port_file, port)
    if not args.quiet:
        log(f"cd2emu: listening on {server.emu.base_url}")
    while not stop.wait(0.1):
        pass
    for srv in servers:
        srv.shutdown()
        srv.server_close()
    if not args.quiet:
        log("cd2emu: stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
