#!/usr/bin/env bash
# Sets up this machine for cd2sync: packages (Debian 12), build, install.
# Safe to run again; installs only what is missing. Sourced by demo.sh and
# test.sh. As root it installs packages and the extension, and runs servers
# as the unprivileged user $CD2_USER (initdb and postgres refuse root).
set -euo pipefail

CD2_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CD2_USER=${CD2_USER:-cd2sync}
PACKAGES="postgresql-15 postgresql-server-dev-15 postgresql-contrib libcurl4-openssl-dev zlib1g-dev
          libipc-run-perl python3 make gcc curl ca-certificates openssl"
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

setup_all() {
    ensure_packages
    ensure_user
    build_install
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    setup_all
fi
