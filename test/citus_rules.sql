-- The rules that keep the DDL cd2sync generates ready for Citus's
-- schema-based sharding (docs/design.md, "Scale-out with Citus"), as one
-- query over the catalog: every row is a violation. t/014_production.pl
-- runs it after syncs that made instance tables with every feature
-- (bookkeeping columns, lookup indexes, merges, a feed) and expects none.
WITH inst AS (
    SELECT n.oid AS nsp, n.nspname FROM cd2sync.instances i JOIN pg_namespace n ON n.nspname = i.target_schema
), rel AS (
    SELECT c.oid, c.relkind, format('%I.%I', inst.nspname, c.relname) AS name
      FROM pg_class c JOIN inst ON inst.nsp = c.relnamespace
     WHERE c.relkind IN ('r', 'p')
)
-- 1. Citus distributes a schema only if no extension owns it or its tables
SELECT format('schema %I', inst.nspname) AS object, 'owned by an extension' AS rule
  FROM inst JOIN pg_depend d ON d.classid = 'pg_namespace'::regclass AND d.objid = inst.nsp AND d.deptype = 'e'
UNION ALL
SELECT rel.name, 'owned by an extension'
  FROM rel JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = rel.oid AND d.deptype = 'e'
-- 2. a primary key: upserts (ON CONFLICT) and deletes route by it
UNION ALL
SELECT rel.name, 'no primary key' FROM rel
 WHERE NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conrelid = rel.oid AND k.contype = 'p')
-- 3. no foreign key: a distributed schema's tables may not reference
--    another schema's (cd2sync's catalog stays local on the coordinator)
UNION ALL
SELECT rel.name, 'foreign key ' || k.conname
  FROM rel JOIN pg_constraint k ON k.conrelid = rel.oid AND k.contype = 'f'
UNION ALL
SELECT format('%s', k.conrelid::regclass), 'foreign key into an instance table'
  FROM rel JOIN pg_constraint k ON k.confrelid = rel.oid AND k.contype = 'f'
-- 4. no inheritance (declarative partitioning is fine)
UNION ALL
SELECT rel.name, 'inheritance'
  FROM rel JOIN pg_inherits h ON (h.inhrelid = rel.oid OR h.inhparent = rel.oid)
 WHERE rel.relkind = 'r' AND NOT EXISTS (SELECT 1 FROM pg_class p WHERE p.oid = h.inhparent AND p.relkind = 'p')
-- 5. column types, defaults and index expressions from PostgreSQL itself
--    or the table's own schema (Citus creates a distributed schema's enum
--    types on its node): a worker node has no cd2sync objects
UNION ALL
SELECT rel.name || '.' || a.attname, 'type ' || format_type(a.atttypid, a.atttypmod) || ' is from elsewhere'
  FROM rel JOIN pg_class c ON c.oid = rel.oid
  JOIN pg_attribute a ON a.attrelid = rel.oid AND a.attnum > 0 AND NOT a.attisdropped
  JOIN pg_type t ON t.oid = a.atttypid
  LEFT JOIN pg_type e ON e.oid = t.typelem AND t.typelem <> 0
 WHERE coalesce(e.typnamespace, t.typnamespace) NOT IN ('pg_catalog'::regnamespace, c.relnamespace)
UNION ALL
SELECT rel.name || '.' || a.attname, 'default uses ' || d.refobjid::regprocedure
  FROM rel JOIN pg_attrdef ad ON ad.adrelid = rel.oid
  JOIN pg_attribute a ON a.attrelid = rel.oid AND a.attnum = ad.adnum
  JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid
                  AND d.refclassid = 'pg_proc'::regclass
  JOIN pg_proc p ON p.oid = d.refobjid
 WHERE p.pronamespace <> 'pg_catalog'::regnamespace
UNION ALL
SELECT rel.name || '.' || a.attname, 'default uses sequence ' || d.refobjid::regclass
  FROM rel JOIN pg_attrdef ad ON ad.adrelid = rel.oid
  JOIN pg_attribute a ON a.attrelid = rel.oid AND a.attnum = ad.adnum
  JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid
                  AND d.refclassid = 'pg_class'::regclass
UNION ALL
SELECT format('index %s', i.indexrelid::regclass), 'expression calls ' || p.oid::regprocedure
  FROM rel JOIN pg_index i ON i.indrelid = rel.oid
  JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid
                  AND d.refclassid = 'pg_proc'::regclass
  JOIN pg_proc p ON p.oid = d.refobjid
 WHERE p.pronamespace <> 'pg_catalog'::regnamespace
-- 6. no triggers but the change feeds' (outside the Citus design for now)
UNION ALL
SELECT rel.name, 'trigger ' || g.tgname
  FROM rel JOIN pg_trigger g ON g.tgrelid = rel.oid AND NOT g.tgisinternal
 WHERE NOT (g.tgname ~ '^cd2_feed_(insert|update|delete)$'
            AND g.tgfoid = 'cd2sync._feed_capture_row()'::regprocedure)
   AND NOT (g.tgname = 'cd2_feed_truncate' AND g.tgfoid = 'cd2sync._feed_capture()'::regprocedure)
ORDER BY 1, 2;
