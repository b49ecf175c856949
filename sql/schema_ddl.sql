-- From a CD2 schema to a table: the type mapping of cd2-api.md, NOT NULL
-- from "required", the key as primary key, enums, comments, evolution.
\set VERBOSITY sqlstate
SELECT ord, column_name, type_sql, is_key, not_null, enum_values
  FROM cd2sync._schema_columns('s1', 'things', $${"version": 3, "schema": {
  "type": "object",
  "properties": {
    "key": {"type": "object", "properties": {"id": {"type": "integer", "format": "int64"}}, "required": ["id"]},
    "value": {"type": "object", "required": ["i32", "state"], "properties": {
      "i16": {"type": "integer", "format": "int16"},
      "i32": {"type": "integer", "format": "int32"},
      "i64": {"type": "integer", "format": "int64"},
      "inone": {"type": "integer"},
      "f32": {"type": "number", "format": "float32"},
      "f64": {"type": "number", "format": "float64"},
      "fnone": {"type": "number"},
      "ts": {"type": "string", "format": "date-time", "description": "When it happened."},
      "d": {"type": "string", "format": "date"},
      "t": {"type": "string", "format": "time"},
      "u": {"type": "string", "format": "uuid"},
      "state": {"type": "string", "enum": ["active", "deleted"]},
      "code": {"type": "string", "maxLength": 12},
      "txt": {"type": "string"},
      "b": {"type": "boolean"},
      "obj": {"type": "object", "properties": {"a": {"type": "integer"}}},
      "obj2": {"type": "object"},
      "tags": {"type": "array", "items": {"type": "string"}},
      "nums": {"type": "array", "items": {"type": "integer", "format": "int32"}},
      "objs": {"type": "array", "items": {"type": "object"}},
      "one": {"oneOf": [{"type": "string"}, {"type": "string", "format": "date-time"}]},
      "mixed": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
      "nullable": {"type": ["string", "null"]},
      "ref": {"$ref": "#/definitions/Ref"}
    }},
    "meta": {"type": "object", "properties": {"ts": {"type": "string", "format": "date-time"}}}
  },
  "definitions": {"Ref": {"type": "integer", "format": "int32"}}
}}$$::json) ORDER BY ord;

-- creating the table
SELECT cd2sync._ensure_table('s1', 'things', $${"version": 1, "schema": {"properties": {
  "key": {"properties": {"id": {"type": "integer"}}},
  "value": {"required": ["state"], "properties": {
    "state": {"type": "string", "enum": ["active", "deleted"], "description": "Workflow state."},
    "name": {"type": "string", "maxLength": 20},
    "at": {"type": "string", "format": "date-time"},
    "tags": {"type": "array", "items": {"type": "string"}}}}}}}$$::json) AS created;
\d s1.things
SELECT col_description('s1.things'::regclass, attnum) AS state_comment
  FROM pg_attribute WHERE attrelid = 's1.things'::regclass AND attname = 'state';
SELECT enum_range(NULL::s1.things__state);

-- a newer schema: new column, new enum value; a column removed upstream stays
CREATE VIEW s1.user_view AS SELECT id, name, at FROM s1.things;
SELECT cd2sync._ensure_table('s1', 'things', $${"version": 2, "schema": {"properties": {
  "key": {"properties": {"id": {"type": "integer"}}},
  "value": {"required": ["state"], "properties": {
    "state": {"type": "string", "enum": ["active", "deleted", "archived"]},
    "name": {"type": "string", "maxLength": 20},
    "tags": {"type": "array", "items": {"type": "string"}},
    "score": {"type": "number"}}}}}}$$::json) AS created;
\d s1.things
SELECT enum_range(NULL::s1.things__state);
SELECT * FROM s1.user_view;

-- version 3: widen what can be widened in place, the view on a column
-- created again; d (varchar to date) waits for a fresh snapshot
CREATE TABLE s1.widen (id bigint PRIMARY KEY, a smallint, b real, c varchar(5), d varchar(5), e integer);
CREATE VIEW s1.widen_view AS SELECT id, e FROM s1.widen;
INSERT INTO s1.widen (id, b) VALUES (1, 0.1), (2, 3.4028235e38), (3, -1.5e-7), (4, 'NaN');
CREATE TEMP TABLE widen_v3 AS SELECT $${"version": 3, "schema": {"properties": {
  "key": {"properties": {"id": {"type": "integer"}}},
  "value": {"properties": {
    "a": {"type": "integer", "format": "int32"},
    "b": {"type": "number"},
    "c": {"type": "string", "maxLength": 50},
    "d": {"type": "string", "format": "date"},
    "e": {"type": "integer", "format": "int64"}}}}}}$$::json AS doc;
SELECT cd2sync._ensure_table('s1', 'widen', (SELECT doc FROM widen_v3)) AS created;
SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute
 WHERE attrelid = 's1.widen'::regclass AND attnum > 0 ORDER BY attnum;
SELECT pg_get_viewdef('s1.widen_view'::regclass) AS recreated_view;
-- a real becomes the double its text says: the values show as before
SELECT id, b FROM s1.widen ORDER BY id;
SELECT cd2sync._pending_types('s1', 'widen', (SELECT doc FROM widen_v3)) AS pending;
SELECT cd2sync._is_widening('character varying(5)', 'text'), cd2sync._is_widening('character varying(10)', 'character varying(5)'),
       cd2sync._is_widening('bigint', 'integer'), cd2sync._is_widening('text', 'bigint');

-- hostile remote names are quoted, never spliced
SELECT cd2sync._ensure_table('s1', 'we"ird; drop table x', $${"version": 1, "schema": {"properties": {
  "key": {"properties": {"Id Col": {"type": "integer"}}},
  "value": {"properties": {"sel;ect": {"type": "string"}, "naïve": {"type": "string", "enum": ["a'b", "c\"d"]}}}}}}$$::json);
\d s1."we""ird; drop table x"
-- unusable names are refused
SELECT cd2sync._ensure_table('s1', repeat('t', 64), '{"schema": {"properties": {"key": {"properties": {"id": {"type": "integer"}}}}}}');
SELECT cd2sync._ensure_table('s1', 'nokey', '{"schema": {"properties": {"value": {"properties": {"id": {"type": "integer"}}}}}}');
SELECT cd2sync._ensure_table('s1', 'badcol', '{"schema": {"properties": {"key": {"properties": {"cd2_x": {"type": "integer"}}}}}}');
SELECT to_regclass('s1.nokey') IS NULL AND to_regclass('s1.badcol') IS NULL AS nothing_created;
-- long enum type names stay unique
SELECT cd2sync._enum_type_name(repeat('t', 40), repeat('c', 30)) <> cd2sync._enum_type_name(repeat('t', 40), repeat('c', 31)) AS distinct_names,
       octet_length(cd2sync._enum_type_name(repeat('t', 40), repeat('c', 30))) <= 63 AS fits;

-- a type change that a view cannot follow changes nothing (the caller keeps
-- the old type, with a warning)
CREATE TABLE s1.retype (id bigint PRIMARY KEY, n double precision);
INSERT INTO s1.retype VALUES (1, 1.5);
CREATE VIEW s1.retype_math AS SELECT id, n + 1 AS n1 FROM s1.retype;
CREATE VIEW s1.retype_top AS SELECT * FROM s1.retype_math;
SELECT cd2sync._alter_column_type('s1.retype', 'n', 'text', true);
SELECT format_type(atttypid, atttypmod) AS n_type, (SELECT n1 FROM s1.retype_top) AS n1
  FROM pg_attribute WHERE attrelid = 's1.retype'::regclass AND attname = 'n';
-- nor are materialized views rebuilt
DROP VIEW s1.retype_top, s1.retype_math;
CREATE MATERIALIZED VIEW s1.retype_mv AS SELECT id, n FROM s1.retype;
SELECT cd2sync._alter_column_type('s1.retype', 'n', 'text', true);
DROP MATERIALIZED VIEW s1.retype_mv;
-- without dependents: the values go (using_null) and the type changes
SELECT cd2sync._alter_column_type('s1.retype', 'n', 'text', true);
SELECT id, n FROM s1.retype;

-- a pending type change that fails for any other reason (here a user's
-- foreign key to the table) is not swallowed: the error fails the sync,
-- nothing changes, and the change stays pending for the next snapshot
INSERT INTO cd2sync.instances (name, client_id, target_schema) VALUES ('ddl', 'us-east-1#ddl', 's1');
CREATE TABLE s1.pend (id bigint PRIMARY KEY, n double precision);
INSERT INTO s1.pend VALUES (1, 1.5), (2, 2.5);
CREATE TABLE public.pend_ref (id bigint REFERENCES s1.pend);
INSERT INTO public.pend_ref VALUES (1);
INSERT INTO cd2sync.table_state (instance, table_name, pending_types) VALUES ('ddl', 'pend', '{"n": "text"}');
SELECT cd2sync._apply_pending_types('ddl', 'pend', 's1.pend');
SELECT s.pending_types, format_type(a.atttypid, a.atttypmod) AS n_type, (SELECT count(*) FROM s1.pend) AS n_rows
  FROM cd2sync.table_state s, pg_attribute a
 WHERE s.table_name = 'pend' AND a.attrelid = 's1.pend'::regclass AND a.attname = 'n';
-- once the reference is gone: the rows are deleted (and counted), the type changes
DROP TABLE public.pend_ref;
SELECT cd2sync._apply_pending_types('ddl', 'pend', 's1.pend') AS rows_deleted;
SELECT s.pending_types, format_type(a.atttypid, a.atttypmod) AS n_type, (SELECT count(*) FROM s1.pend) AS n_rows
  FROM cd2sync.table_state s, pg_attribute a
 WHERE s.table_name = 'pend' AND a.attrelid = 's1.pend'::regclass AND a.attname = 'n';
-- nothing pending: nothing to do
SELECT cd2sync._apply_pending_types('ddl', 'pend', 's1.pend') IS NULL AS nothing_pending;
DELETE FROM cd2sync.instances WHERE name = 'ddl';
