-- cd2sync 1.0 -> 1.1. Every change to the SQL surface since 1.0, in the
-- order the install script (the parts in src/sql/) makes it; t/011_upgrade.pl
-- checks that an updated database and a fresh install of 1.1 are the same.
\echo Use "ALTER EXTENSION cd2sync UPDATE TO '1.1'" to load this file. \quit
