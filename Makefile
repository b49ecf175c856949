# cd2sync: PGXS build. `make && make install`, then see README.md.
EXTENSION = cd2sync
EXTVERSION = 0.1
MODULE_big = cd2sync
OBJS = src/cd2sync.o src/http.o src/download.o src/dap_client.o src/decode.o src/codec.o \
       src/inflater.o src/catalog.o src/worker.o src/sync_functions.o src/scheduler.o

# The extension script is assembled from one file per stage, in this order.
SQL_PARTS = sql/catalog.sql sql/instances.sql sql/schema_ddl.sql sql/apply.sql sql/reconcile.sql \
            sql/sync.sql sql/privileges.sql
DATA_built = $(EXTENSION)--$(EXTVERSION).sql

REGRESS = setup instances sync_args schema_ddl apply watermarks reconcile
REGRESS_OPTS = --inputdir=test --outputdir=test --temp-instance=./tmp_regress \
               --temp-config=test/regress.conf
TAP_TESTS = 1

# PostgreSQL's own headers are not -Wextra clean for unused parameters
PG_CPPFLAGS = -Wall -Wextra -Wno-unused-parameter
SHLIB_LINK = -lcurl -lz -lpthread
EXTRA_CLEAN = $(DATA_built) test/results test/regression.diffs test/regression.out tmp_check tmp_regress

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
# no JIT bitcode: it needs clang, and JIT does not help what runs here
override with_llvm = no
include $(PGXS)

# PGXS does not track headers: every object depends on all of ours
$(OBJS): $(wildcard src/*.h)

$(DATA_built): $(SQL_PARTS)
	cat $^ > $@

# The benchmark (bench/bench.sh): sets up, generates data, prints figures against baselines.
.PHONY: bench
bench:
	bash bench/bench.sh
