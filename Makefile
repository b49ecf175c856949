# cd2sync: PGXS build. `make && make install`, then see README.md.
EXTENSION = cd2sync
# The version lives in cd2sync.control alone
EXTVERSION := $(shell sed -n "s/^default_version *= *'\(.*\)'/\1/p" $(EXTENSION).control)
MODULE_big = cd2sync
OBJS = src/cd2sync.o src/settings.o src/feeds.o src/capture.o src/http.o src/download.o src/dap_client.o \
       src/decode.o src/codec.o src/inflater.o src/catalog.o src/launch.o src/progress.o \
       src/load.o src/table_sync.o src/run.o src/sync_functions.o src/scheduler.o

# The install script of the current version is assembled from one file per
# stage, in this order. Released versions' install scripts are frozen, and
# each later version has an upgrade script (src/sql/cd2sync--A--B.sql).
SQL_PARTS = src/sql/catalog.sql src/sql/instances.sql src/sql/schema_ddl.sql src/sql/apply.sql \
            src/sql/reconcile.sql src/sql/feeds.sql src/sql/after_apply.sql src/sql/sync.sql \
            src/sql/monitoring.sql src/sql/privileges.sql
DATA_built = $(EXTENSION)--$(EXTVERSION).sql
DATA = $(filter-out src/sql/$(DATA_built),$(wildcard src/sql/$(EXTENSION)--*.sql))

# pg_regress: sql/*.sql against expected/*.out
REGRESS = setup instances sync_args schema_ddl apply watermarks reconcile feeds monitoring
REGRESS_OPTS = --temp-instance=./tmp_regress --temp-config=test/regress.conf
TAP_TESTS = 1

# PostgreSQL's own headers are not -Wextra clean for unused parameters
PG_CPPFLAGS = -Wall -Wextra -Wno-unused-parameter -DCD2SYNC_VERSION='"$(EXTVERSION)"'
SHLIB_LINK = -lcurl -lz -lpthread
EXTRA_CLEAN = $(DATA_built) results regression.diffs regression.out tmp_check tmp_regress

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
# no JIT bitcode: it needs clang, and JIT does not help what runs here
override with_llvm = no
include $(PGXS)

# PGXS does not track headers: every object depends on all of ours
$(OBJS): $(wildcard src/*.h)
# nor the version, which the library compares with the installed SQL
src/cd2sync.o src/catalog.o src/feeds.o src/http.o src/launch.o src/scheduler.o: $(EXTENSION).control

$(DATA_built): $(SQL_PARTS)
	cat $^ > $@

# The benchmark (bench/bench.sh): sets up, generates data, prints figures against baselines.
.PHONY: bench
bench:
	bash bench/bench.sh
