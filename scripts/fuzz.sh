#!/usr/bin/env bash
# Fuzzes the decoders of src/codec.c (gunzip stepper, TSV field dropper,
# record length guard) and the inflater thread of src/inflater.c with the
# libFuzzer harnesses in fuzz/, each for FUZZ_SECONDS (default 60), under
# ASan and UBSan. Exits non-zero when a
# harness finds a crash, a leak or a wrong answer; the failing input is kept
# in the work directory it names.
#
#   bash scripts/fuzz.sh                  # 60 s a harness
#   FUZZ_SECONDS=600 bash scripts/fuzz.sh
#   FUZZ_HARNESSES="tsv lines" bash scripts/fuzz.sh
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
seconds="${FUZZ_SECONDS:-60}"
harnesses="${FUZZ_HARNESSES:-gunzip tsv lines inflater}"
CC="${CC:-clang}"

# clang, its libFuzzer runtime (Debian 12: libclang-rt-14-dev) and zlib's headers
can_build() {
	command -v "$CC" >/dev/null 2>&1 || return 1
	printf '#include <zlib.h>\n#include <stdint.h>\n#include <stddef.h>\nint LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { (void) d; (void) n; return zlibVersion() == 0; }\n' \
		>"$1/probe.c"
	"$CC" -fsanitize=fuzzer,address,undefined "$1/probe.c" -lz -o "$1/probe" >/dev/null 2>&1
}

work="$(mktemp -d "${TMPDIR:-/tmp}/cd2sync-fuzz.XXXXXX")"
if ! can_build "$work"; then
	echo "fuzz.sh: installing clang, libFuzzer and zlib headers"
	sudo=""
	[ "$(id -u)" -eq 0 ] || sudo="sudo"
	$sudo apt-get update -qq
	$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang libclang-rt-14-dev zlib1g-dev
	CC=clang
	can_build "$work" || { echo "fuzz.sh: cannot build a libFuzzer harness with $CC" >&2; exit 2; }
fi

# --- build
for h in $harnesses; do
	"$CC" -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -g -O1 \
		-Wall -Wextra -Werror -I"$root/src" "$root/fuzz/fuzz_$h.c" "$root/src/codec.c" \
		"$root/src/inflater.c" -lz -lpthread -o "$work/fuzz_$h"
done

# --- seed corpora (the first bytes of each input steer the harness; see fuzz/*.c)
tsv_lines() {
	printf 'meta.ts\tmeta.action\tkey.id\tvalue.name\n'
	printf '2024-01-01T00:00:00Z\tU\t1\talice\n2024-01-02T00:00:00Z\tD\t2\t\\N\n'
	printf 'x\ty\tz\tw\textra\tmore\n\n\tleading tab\ttrailing\t\n'
}
mkdir -p "$work/seed_gunzip" "$work/seed_tsv" "$work/seed_lines" "$work/seed_inflater"
tsv_lines >"$work/plain"
{ printf '\x10\x07'; gzip -c <"$work/plain"; } >"$work/seed_gunzip/one_member"
{ printf '\x21\x40'; gzip -c <"$work/plain"; printf 'second member\n' | gzip -c; printf '' | gzip -c; } \
	>"$work/seed_gunzip/three_members"
{ printf '\x05\x01'; gzip -1 -c <"$work/plain" | head -c 30; } >"$work/seed_gunzip/truncated"
{ printf '\x03\x3f'; cat "$work/plain"; } >"$work/seed_gunzip/plain"
{ printf '\x04\x0d\x00\x2a'; tsv_lines; } >"$work/seed_tsv/drop_meta"
{ printf '\x04\x0e\x00\x07'; tsv_lines; } >"$work/seed_tsv/drop_first"
{ printf '\x02\x01\x00\x63'; tsv_lines; } >"$work/seed_tsv/short_header"
{ printf '\x10\x00\x11'; tsv_lines; } >"$work/seed_lines/limit_16"
{ printf '\x00\x01\x05'; tsv_lines; } >"$work/seed_lines/limit_256"
{ printf '\x3f\x07\x01'; tsv_lines; } >"$work/seed_inflater/gzip"
{ printf '\xff\xff\x03'; tsv_lines; } >"$work/seed_inflater/big_wrapping"
{ printf '\x00\x3f\x13'; tsv_lines; } >"$work/seed_inflater/big_stopped"
{ printf '\x10\x10\x02'; tsv_lines; } >"$work/seed_inflater/truncated"
{ printf '\x01\x05\x00'; tsv_lines; } >"$work/seed_inflater/plain"

# --- run
failed=""
for h in $harnesses; do
	mkdir -p "$work/corpus_$h" "$work/artifacts_$h"
	echo "== fuzz_$h: ${seconds}s"
	if "$work/fuzz_$h" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
		-print_final_stats=1 -artifact_prefix="$work/artifacts_$h/" \
		"$work/corpus_$h" "$work/seed_$h" >"$work/fuzz_$h.log" 2>&1; then
		status=passed
	else
		status=FAILED
		failed="$failed $h"
		tail -n 60 "$work/fuzz_$h.log"
	fi
	last="$(grep -E '^#[0-9]+' "$work/fuzz_$h.log" | tail -n 1 || true)"
	execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/fuzz_$h.log")"
	echo "   $status: ${execs:-?} executions; last status: ${last:-none}"
done

if [ -n "$failed" ]; then
	echo "fuzz.sh: failures in:$failed (logs and failing inputs in $work)" >&2
	exit 1
fi
rm -rf "$work"
echo "fuzz.sh: all harnesses passed"
