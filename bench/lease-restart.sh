#!/usr/bin/env bash
# How long etcd and Keel take to be ready again after a restart, holding LEASES leases with one
# key attached to each: a single member and a 3-member cluster, stopped with SIGTERM and killed
# with SIGKILL. See bench/README.md ("Restart with 100,000 leases").
#
# For each system and cluster size: start fresh members, grant LEASES leases of TTL seconds and put
# one key under each (`keel bench --op lease-load`, LOAD_CLIENTS in flight, to the leader); then,
# for each signal, RESTARTS times: send the signal to every member, wait until all have exited,
# start them again on their data dirs, and time from that start to ready: the first member answers
# a linearizable Range of key-00000000 (which must still be attached to its lease) and then
# LeaseTimeToLive of that lease with a TTL (`keel bench --op lease-ready`, polling every 10 ms).
#
# Installs nothing. Needs: etcd (Debian: apt-get install etcd-server), and the release builds of
# keel and keeld (cargo build --release -p keel-cli -p keel-kv).
#
# Knobs (environment): LEASES=100000 TTL=3600 SIZES="1 3" SIGNALS="TERM KILL" RESTARTS=3
# SYSTEMS="etcd keel" LOAD_CLIENTS=256 CONNS=8 READY_TIMEOUT=300 VALUE_SIZE=64 PORT_BASE=21000
# KEEP=0 KEEL=target/release/keel KEELD=target/release/keeld ETCD=$(command -v etcd)
# KEEL_BENCH_DIR=target/tmp (data dirs; not tmpfs) RESULTS=<file.jsonl>
# Quick run: LEASES=10000 SIZES=1 RESTARTS=1 bench/lease-restart.sh

set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

LEASES=${LEASES:-100000}
TTL=${TTL:-3600}
SIZES=${SIZES:-1 3}
SIGNALS=${SIGNALS:-TERM KILL}
RESTARTS=${RESTARTS:-3}
SYSTEMS=${SYSTEMS:-etcd keel}
LOAD_CLIENTS=${LOAD_CLIENTS:-256}
CONNS=${CONNS:-8}
READY_TIMEOUT=${READY_TIMEOUT:-300}
VALUE_SIZE=${VALUE_SIZE:-64}
PORT_BASE=${PORT_BASE:-21000}
KEEP=${KEEP:-0}
KEEL=${KEEL:-$root/target/release/keel}
KEELD=${KEELD:-$root/target/release/keeld}
ETCD=${ETCD:-$(command -v etcd || true)}
BENCH_DIR=${KEEL_BENCH_DIR:-$root/target/tmp}

prog=lease-restart
# shellcheck source=bench/cluster.sh
. "$root/bench/cluster.sh"

check_binaries
for knob in LEASES TTL RESTARTS LOAD_CLIENTS CONNS READY_TIMEOUT VALUE_SIZE PORT_BASE; do
    [[ ${!knob} =~ ^[0-9]+$ ]] || die "$knob='${!knob}' is not a whole number"
done
((LEASES >= 1 && TTL >= 1 && RESTARTS >= 1 && LOAD_CLIENTS >= 1 && CONNS >= 1 && READY_TIMEOUT >= 1)) ||
    die "LEASES, TTL, RESTARTS, LOAD_CLIENTS, CONNS and READY_TIMEOUT must be at least 1"
for s in $SIZES; do [[ $s =~ ^[1-9]$ ]] || die "SIZES: '$s' is not a cluster size from 1 to 9"; done
for s in $SIGNALS; do [[ $s == TERM || $s == KILL ]] || die "SIGNALS: '$s' is neither TERM nor KILL"; done
for s in $SYSTEMS; do [[ $s == etcd || $s == keel ]] || die "SYSTEMS: '$s' is neither etcd nor keel"; done

min() { echo $(($1 < $2 ? $1 : $2)); }
field() { # name json-line -> value
    sed -nE "s/.*\"$1\":([0-9.eE+-]+).*/\1/p" <<<"$2"
}
median() { # numbers on stdin -> median (mean of the middle two for an even count)
    sort -g | awk '{v[NR]=$1} END {if (NR==0) print "-"; else if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'
}
# Now, in µs since the epoch, without a fork: bash's EPOCHREALTIME is seconds with 6 decimals.
now_us() { local t=$EPOCHREALTIME; echo "${t//[.,]/}"; }

mkdir -p "$BENCH_DIR"
work=$(mktemp -d "$BENCH_DIR/lease-restart.XXXXXX")
RESULTS=${RESULTS:-$BENCH_DIR/lease-restart-$(date +%Y%m%d-%H%M%S).jsonl}
: >"$RESULTS"
cleanup_more() { [[ -s $RESULTS ]] || rm -f "$RESULTS"; }
cluster_init

# Fills the running cluster; sets `lease` to the id that key-00000000 is attached to.
load() { # system
    local line started=$SECONDS
    run_child "$work/load.json" "$work/bench.log" \
        "$KEEL" --endpoints "$(endpoints "$1")" --timeout 10 bench --json --target-leader --op lease-load \
        --leases "$LEASES" --ttl "$TTL" --clients "$LOAD_CLIENTS" --conns "$(min "$LOAD_CLIENTS" "$CONNS")" \
        --value-size "$VALUE_SIZE" || die "$1: the lease load failed (see $work/bench.log; KEEP=1 keeps it)"
    line=$(<"$work/load.json")
    lease=$(field sample_lease "$line")
    [[ $(field errors "$line") == 0 && -n $lease ]] ||
        die "$1: the lease load had errors (a restart of a partial load would measure less): $line"
    note "$1, $size member(s): $LEASES leases with a key each in $((SECONDS - started)) s ($(field ops_per_s "$line") a second); key-00000000 is on lease $lease"
}

# One restart: SIGNAL to every member, wait for all to exit, start them again, time to ready.
restart() { # system signal run
    local system=$1 signal=$2 run=$3 t0 line
    stop_cluster 60 "$signal"
    if ((forced)); then note "$system: members still ran 60 s after SIG$signal and were killed"; fi
    t0=$(now_us)
    "start_$system" "m$size"
    : >"$work/ready.log"
    if ! run_child "$work/ready.json" "$work/ready.log" \
        "$KEEL" --endpoints "127.0.0.1:$(client_port "$system" 1)" --timeout 2 bench --json \
        --op lease-ready --lease-id "$lease" --duration "$READY_TIMEOUT"; then
        tail -n 5 "$work/ready.log" >&2
        tail -n 20 "$work/$system-m$size"/*.log >&2
        die "$system, $size member(s): not ready after SIG$signal (its log is above)"
    fi
    # What the members answered before they were ready, per restart (KEEP=1 keeps it).
    { echo "== $system, $size member(s), SIG$signal #$run"; cat "$work/ready.log"; } >>"$work/probe.log"
    line=$(<"$work/ready.json")
    local range_ms ready_ms
    range_ms=$(awk -v a="$(field range_unix_us "$line")" -v t="$t0" 'BEGIN { printf "%.1f", (a - t) / 1000 }')
    ready_ms=$(awk -v a="$(field ready_unix_us "$line")" -v t="$t0" 'BEGIN { printf "%.1f", (a - t) / 1000 }')
    echo "{\"system\":\"$system\",\"members\":$size,\"signal\":\"$signal\",\"run\":$run,\"leases\":$LEASES,\"range_ms\":$range_ms,\"ready_ms\":$ready_ms}" >>"$RESULTS"
    note "$system, $size member(s), SIG$signal #$run: range after $range_ms ms, ready after $ready_ms ms ($(field attempts "$line") attempts)"
    check_alive "$system" "m$size"
}

note "etcd: $("$ETCD" --version | sed -n 1p), keeld: $("$KEELD" --version)"
note "$LEASES leases (TTL $TTL s) with a ${VALUE_SIZE}-byte key each; sizes: $SIZES; signals: $SIGNALS; $RESTARTS restart(s) each"
load_before=$(uptime)
for size in $SIZES; do
    for system in $SYSTEMS; do
        start_cluster "$system" "m$size"
        load "$system"
        for signal in $SIGNALS; do
            for run in $(seq "$RESTARTS"); do restart "$system" "$signal" "$run"; done
        done
        stop_cluster
        if [[ $KEEP != 1 ]]; then rm -rf "${work:?}/$system-m$size"; fi
    done
done
load_after=$(uptime)

med() { # system members signal field
    grep "\"system\":\"$1\",\"members\":$2,\"signal\":\"$3\"," "$RESULTS" |
        while read -r line; do field "$4" "$line"; done | median
}
ms() { awk -v x="$1" 'BEGIN { if (x == "-") print "-"; else printf "%.1f", x }'; }
ratio() { awk -v k="$1" -v e="$2" 'BEGIN { if (k == "-" || e == "-" || e == 0) print "-"; else printf "%.2f", k / e }'; }
verdict() { awk -v r="$1" 'BEGIN { if (r == "-") print "-"; else if (r < 2) print "PASS"; else print "FAIL" }'; }

echo
echo "Restart to ready with $LEASES leases (a key each): medians of $RESTARTS restart(s), ms from starting the members"
fmt="%-8s %-7s %11s %11s %11s %11s %6s %5s\n"
# shellcheck disable=SC2059 # the format is ours
printf "$fmt" "MEMBERS" "SIGNAL" "ETCD RANGE" "KEEL RANGE" "ETCD READY" "KEEL READY" "RATIO" "BAR"
for size in $SIZES; do
    for signal in $SIGNALS; do
        er=$(med etcd "$size" "$signal" range_ms) kr=$(med keel "$size" "$signal" range_ms)
        ey=$(med etcd "$size" "$signal" ready_ms) ky=$(med keel "$size" "$signal" ready_ms)
        r=$(ratio "$ky" "$ey")
        # shellcheck disable=SC2059
        printf "$fmt" "$size" "SIG$signal" "$(ms "$er")" "$(ms "$kr")" "$(ms "$ey")" "$(ms "$ky")" "$r" "$(verdict "$r")"
    done
done
echo "range: a linearizable Range of key-00000000 answered (through member 1); ready: then LeaseTimeToLive of its lease answered a TTL"
echo "ratio: Keel/etcd of the ready times; bar: under 2 (the issue's)"
echo "load before: $load_before"
echo "load after:  $load_after"
echo "every restart: $RESULTS"
