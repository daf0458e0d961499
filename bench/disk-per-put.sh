#!/usr/bin/env bash
# Disk bytes per put: PUTS puts of VALUE_SIZE-byte values into a fresh 3-member etcd and a fresh
# 3-node Keel on loopback, a clean stop, then each member's state directory size / PUTS (etcd: its
# member dir; Keel: its data dir), split into log, state and the rest. See bench/README.md
# ("Disk bytes per put").
#
# Installs nothing. Needs: etcd (Debian: apt-get install etcd-server), and the release builds of
# keel and keeld (cargo build --release -p keel-cli -p keel-kv).
#
# Knobs (environment): PUTS=100000 KEYS=$PUTS VALUE_SIZE=256 SYSTEMS="etcd keel" PORT_BASE=21000
# KEEP=0 KEEL=target/release/keel KEELD=target/release/keeld ETCD=$(command -v etcd)
# KEEL_BENCH_DIR=target/tmp (data dirs; not tmpfs) RESULTS=<file.jsonl>
# Quick run: PUTS=10000 bench/disk-per-put.sh

set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

PUTS=${PUTS:-100000}
KEYS=${KEYS:-$PUTS}
VALUE_SIZE=${VALUE_SIZE:-256}
SYSTEMS=${SYSTEMS:-etcd keel}
PORT_BASE=${PORT_BASE:-21000}
KEEP=${KEEP:-0}
KEEL=${KEEL:-$root/target/release/keel}
KEELD=${KEELD:-$root/target/release/keeld}
ETCD=${ETCD:-$(command -v etcd || true)}
BENCH_DIR=${KEEL_BENCH_DIR:-$root/target/tmp}

prog=disk-per-put
# shellcheck source=bench/cluster.sh
. "$root/bench/cluster.sh"

check_binaries
for knob in PUTS KEYS VALUE_SIZE PORT_BASE; do
    [[ ${!knob} =~ ^[0-9]+$ ]] || die "$knob='${!knob}' is not a whole number"
done
((PUTS >= 1 && KEYS >= 1)) || die "PUTS and KEYS must be at least 1"
for system in $SYSTEMS; do
    [[ $system == etcd || $system == keel ]] || die "unknown system '$system' in SYSTEMS (etcd, keel)"
done

mkdir -p "$BENCH_DIR"
work=$(mktemp -d "$BENCH_DIR/disk-per-put.XXXXXX")
RESULTS=${RESULTS:-$BENCH_DIR/disk-per-put-$(date +%Y%m%d-%H%M%S).jsonl}
: >"$RESULTS"
cleanup_more() { [[ -s $RESULTS ]] || rm -f "$RESULTS"; }
cluster_init

bytes() { # path... -> apparent bytes (what `ls -l` adds up to), 0 if none exists
    local b=0 p
    for p in "$@"; do [[ -e $p ]] && b=$((b + $(du -sb "$p" | cut -f1))); done
    echo "$b"
}

# Each member's parts: the log (etcd's WAL, Keel's log) and the state (etcd's bbolt db, Keel's redb
# file); the rest is snapshots and small files.
log_part() { if [[ $1 == etcd ]]; then echo wal; else echo log; fi; }
state_part() { if [[ $1 == etcd ]]; then echo snap/db; else echo state.redb; fi; }

measure() { # system
    local system=$1 i dir total log state allocated
    start_cluster "$system" 1
    local started=$SECONDS
    # Exactly PUTS puts (the preload; 256 in flight), then one get, which writes nothing.
    run_child /dev/null "$work/bench.log" \
        "$KEEL" --endpoints "$(endpoints "$system")" --timeout 5 bench --target-leader --op get --ops 1 \
        --warmup 0 --preload "$PUTS" --key-space "$KEYS" --value-size "$VALUE_SIZE" ||
        die "$system: the puts failed (see $work/bench.log; KEEP=1 keeps it)"
    grep -q "preloaded .* (0 errors)" "$work/bench.log" ||
        die "$system: some puts failed: $(grep preloaded "$work/bench.log" | tail -n 1)"
    note "$system: $PUTS puts in $((SECONDS - started)) s; stopping the members"
    stop_cluster
    sync
    for i in 1 2 3; do
        dir=$(state_dir "$system" 1 "$i")
        total=$(bytes "$dir")
        log=$(bytes "$dir/$(log_part "$system")")
        state=$(bytes "$dir/$(state_part "$system")")
        allocated=$(du -sB1 "$dir" | cut -f1)
        echo "{\"system\":\"$system\",\"member\":$i,\"puts\":$PUTS,\"keys\":$KEYS,\"value_size\":$VALUE_SIZE,\"total_bytes\":$total,\"log_bytes\":$log,\"state_bytes\":$state,\"allocated_bytes\":$allocated}" >>"$RESULTS"
    done
    rm -rf "${work:?}/$system-1"
    : >"$work/bench.log"
}

field() { # name json-line -> value
    sed -nE "s/.*\"$1\":([0-9.eE+-]+).*/\1/p" <<<"$2"
}

note "etcd: $("$ETCD" --version | sed -n 1p), keeld: $("$KEELD" --version)"
note "$PUTS puts of ${VALUE_SIZE}-byte values over $KEYS keys into: $SYSTEMS"
for system in $SYSTEMS; do measure "$system"; done

per_put() { awk -v b="$1" -v n="$PUTS" 'BEGIN { printf "%.0f", b / n }'; }
echo
echo "Disk bytes per put: $PUTS puts of ${VALUE_SIZE}-byte values over $KEYS keys, 3 members on loopback, after a clean stop"
fmt="%-8s %-7s %14s %9s %9s %9s %9s %11s\n"
# shellcheck disable=SC2059 # the format is ours
printf "$fmt" "SYSTEM" "MEMBER" "BYTES" "PER PUT" "LOG" "STATE" "REST" "ALLOCATED"
while read -r line; do
    total=$(field total_bytes "$line") log=$(field log_bytes "$line") state=$(field state_bytes "$line")
    # shellcheck disable=SC2059
    printf "$fmt" "$(sed -nE 's/.*"system":"([a-z]+)".*/\1/p' <<<"$line")" "$(field member "$line")" "$total" \
        "$(per_put "$total")" "$(per_put "$log")" "$(per_put "$state")" "$(per_put $((total - log - state)))" \
        "$(per_put "$(field allocated_bytes "$line")")"
done <"$RESULTS"
echo "PER PUT = BYTES / $PUTS; LOG, STATE, REST and ALLOCATED are per put too. LOG: etcd's member/wal, Keel's log/;"
echo "STATE: etcd's member/snap/db, Keel's state.redb; ALLOCATED: blocks on disk (du), where BYTES is the files' sizes."
echo "etcd preallocates its WAL in 64 MB files, so LOG is at least 64 MB / PUTS: see bench/README.md."
echo "every member: $RESULTS"
