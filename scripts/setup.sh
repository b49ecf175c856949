#!/usr/bin/env bash
# Sets up this machine for cd2sync: packages (Debian 12), build, install.
# Safe to run again; installs only what is missing. Sourced by demo.sh and
# test.sh. As root it installs packages and the extension, and runs servers
# as the unprivileged user $CD2_USER (initdb and postgres refuse root).
set -euo pipefail

CD2_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CD2_USER=${CD2_USER:-cd2sync}
CD2_RELEASE_1_0=bcaa35a   # the commit released as cd2sync 1.0
PACKAGES="postgresql-15 postgresql-server-dev-15 postgresql-contrib libcurl4-openssl-dev zlib1g-dev
          libipc-run-perl python3 make gcc curl ca-certificates openssl git"
export PATH="/usr/lib/postgresql/15/bin:$PATH"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

ensure_packages() {
    local missing=""
    for p in $PACKAGES; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
    done
    if [ -n "$missing" ]; then
        echo "== installing:$missing"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
    fi
    # Debian's package starts a cluster of its own; cd2sync's scripts use throwaway ones
}

ensure_user() {
    if [ "$(id -u)" = 0 ]; then
        id "$CD2_USER" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$CD2_USER"
    else
        CD2_USER=$(id -un)
    fi
}

# Runs a command as the unprivileged user
as_user() {
    if [ "$(id -u)" = 0 ]; then runuser -u "$CD2_USER" -- env PATH="$PATH" "$@"; else "$@"; fi
}

build_install() {
    echo "== building and installing cd2sync"
    make -C "$CD2_ROOT" -s >/dev/null
    as_root make -C "$CD2_ROOT" -s install >/dev/null
}

# A scratch directory the unprivileged user owns
make_workdir() {
    local d
    d=$(mktemp -d "${TMPDIR:-/tmp}/cd2sync.XXXXXX")
    chmod 755 "$d"
    [ "$(id -u)" = 0 ] && chown "$CD2_USER" "$d"
    echo "$d"
}

# A private copy of PostgreSQL 15 under DIR (relocatable: pg_config and the
# server find lib/ and share/ relative to their own binaries); prints its
# bin directory. Used to build and install other builds of cd2sync there.
private_pg_root() {
    local root=$1 pgver=15 bindir d
    mkdir -p "$root/usr/lib/postgresql" "$root/usr/share/postgresql" "$root/usr/include"
    cp -a "/usr/lib/postgresql/$pgver" "$root/usr/lib/postgresql/"
    cp -a "/usr/share/postgresql/$pgver" "$root/usr/share/postgresql/"
    cp -a /usr/include/postgresql "$root/usr/include/"    # PGXS's -I (includedir_server)
    bindir=$root/usr/lib/postgresql/$pgver/bin
    # (the ELF pg_config: /usr/bin/pg_config is a wrapper script with fixed paths)
    for d in "$("$bindir/pg_config" --bindir)" "$("$bindir/pg_config" --pkglibdir)" \
             "$("$bindir/pg_config" --sharedir)" "$("$bindir/pg_config" --includedir-server)"; do
        case "$d" in "$root"/*) ;; *) echo "pg_config is not relocated: $d" >&2; return 1 ;; esac
    done
    # the system's cd2sync is not what this root loads
    rm -f "$("$bindir/pg_config" --pkglibdir)/cd2sync.so" "$("$bindir/pg_config" --sharedir)"/extension/cd2sync*
    echo "$bindir"
}

# cd2sync as released at git commit REV, built and installed into a private
# PostgreSQL root under DIR; prints its bin directory (t/012_upgrade.pl runs
# a cluster of that release, then this build's). Needs the git history.
release_root() {
    local rev=$1 dir=$2 bindir
    mkdir -p "$dir/src"
    git -C "$CD2_ROOT" archive "$rev" | tar -x -C "$dir/src"
    bindir=$(private_pg_root "$dir/root") || return 1
    make -C "$dir/src" -s PG_CONFIG="$bindir/pg_config" >/dev/null
    make -C "$dir/src" -s PG_CONFIG="$bindir/pg_config" install >/dev/null
    echo "$bindir"
}

setup_all() {
    ensure_packages
    ensure_user
    build_install
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    setup_all
fi
