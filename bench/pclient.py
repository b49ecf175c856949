#!/usr/bin/env python3
"""Baseline P of the cd2sync benchmark: what a typical external sync job does. Reads plain COPY
text files (as written by gen.py) and sends one prepared statement per record over a local
connection, all in one transaction: INSERT ... ON CONFLICT (id) DO UPDATE for upserts, DELETE
for deletes. Prints the seconds taken (connection and file parsing included, as for a job).

    python3 pclient.py --host DIR --port N --table schema.table --upserts FILE [--deletes FILE]
                       [--limit ROWS]
"""
import argparse
import re
import sys
import time

import psycopg2

ESC = re.compile(r"\\(.)")
UNESC = {"t": "\t", "n": "\n", "r": "\r", "\\": "\\", "b": "\b", "f": "\f", "v": "\v"}


def field(s):
    if s == "\\N":
        return None
    if "\\" not in s:
        return s
    return ESC.sub(lambda m: UNESC.get(m.group(1), m.group(1)), s)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--user", default="postgres")
    ap.add_argument("--dbname", default="postgres")
    ap.add_argument("--table", required=True)
    ap.add_argument("--upserts", required=True)
    ap.add_argument("--deletes")
    ap.add_argument("--limit", type=int, default=0, help="apply only the first LIMIT upserts")
    a = ap.parse_args()

    t0 = time.time()
    conn = psycopg2.connect(host=a.host, port=a.port, user=a.user, dbname=a.dbname)
    cur = conn.cursor()
    schema, table = a.table.split(".")
    # the CD2 columns (cd2sync's own cd2_* bookkeeping is not in the files)
    cur.execute("SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
                "AND NOT attisdropped AND attname NOT LIKE 'cd2\\_%%' ORDER BY attnum", (a.table,))
    cols = [r[0] for r in cur.fetchall()]
    q = lambda c: '"' + c.replace('"', '""') + '"'  # noqa: E731
    params = ", ".join(f"${k + 1}" for k in range(len(cols)))
    sets = ", ".join(f"{q(c)} = excluded.{q(c)}" for c in cols if c != "id")
    cur.execute(f"PREPARE up AS INSERT INTO {a.table} ({', '.join(q(c) for c in cols)}) VALUES ({params}) "
                f"ON CONFLICT (id) DO UPDATE SET {sets}")
    cur.execute(f"PREPARE del AS DELETE FROM {a.table} WHERE id = $1")
    execute_up = "EXECUTE up (" + ", ".join(["%s"] * len(cols)) + ")"
    n = 0
    with open(a.upserts, encoding="utf-8") as f:
        for line in f:
            if a.limit and n >= a.limit:
                break
            cur.execute(execute_up, [field(x) for x in line.rstrip("\n").split("\t")])
            n += 1
    d = 0
    if a.deletes:
        with open(a.deletes, encoding="utf-8") as f:
            for line in f:
                cur.execute("EXECUTE del (%s)", (line.strip(),))
                d += 1
    conn.commit()
    conn.close()
    print(f"{time.time() - t0:.3f} {n} {d}")


if __name__ == "__main__":
    sys.exit(main())
