#!/usr/bin/env bash
# Keel against etcd: the same `keel bench` matrix (etcd v3 gRPC) against a 3-member etcd and a
# 3-node Keel on loopback, one cluster running at a time, and one table of medians with the
# Keel/etcd ratios. See bench/README.md ("Keel against etcd").
#
# Installs nothing. Needs: etcd (Debian: apt-get install etcd-server), and the release builds of
# keel and keeld (cargo build --release -p keel-cli -p keel-kv).
#
# Knobs (environment): DURATION=10 REPS=3 PRELOAD=100000 WARMUP=1 VALUE_SIZE=256 CONNS=8
# ROWS="put-1 put-64 put-256 get-l-1 get-l-64 get-s-64 put-hist watch-1 watch-100 watch-10000
#       lease-64 keepalive-10000 lock-1 lock-16"
# HISTORY=$PRELOAD HISTORY_KEYS=1000 WATCH_RATE=100 WATCH_STREAMS=16 KEEPALIVE_STREAMS=16
# KEEPALIVE_WINDOW=64 PORT_BASE=21000 KEEP=0
# KEEL=target/release/keel KEELD=target/release/keeld ETCD=$(command -v etcd)
# KEEL_BENCH_DIR=target/tmp (data dirs; not tmpfs, or fsync costs nothing) RESULTS=<file.jsonl>
# Quick run: DURATION=2 REPS=1 PRELOAD=10000 bench/compare-etcd.sh
#
# --tls: both systems with TLS on both ports and client certificates required (certificates from
# `keel certs`), and Keel once more in plaintext in the same run (`keel-plain`), for a
# TLS/PLAIN column: Keel's throughput with TLS over its throughput without.
#
# KEELD_B=<another keeld binary>: an A/B of two Keel builds. That binary runs as one more system
# (`keel-b`) in the same run, and a B/KEEL column gives its throughput over KEELD's.

set -euo pipefail

TLS=0
for arg in "$@"; do
    case $arg in
        --tls) TLS=1 ;;
        -h | --help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "compare-etcd: unknown argument '$arg' (only --tls)" >&2; exit 2 ;;
    esac
done

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

DURATION=${DURATION:-10}
REPS=${REPS:-3}
PRELOAD=${PRELOAD:-100000}
WARMUP=${WARMUP:-1}
VALUE_SIZE=${VALUE_SIZE:-256}
CONNS=${CONNS:-8}
ROWS=${ROWS:-put-1 put-64 put-256 get-l-1 get-l-64 get-s-64 put-hist watch-1 watch-100 watch-10000 lease-64 keepalive-10000 lock-1 lock-16}
HISTORY=${HISTORY:-$PRELOAD}
HISTORY_KEYS=${HISTORY_KEYS:-1000}
WATCH_RATE=${WATCH_RATE:-100}
WATCH_STREAMS=${WATCH_STREAMS:-16}
KEEPALIVE_STREAMS=${KEEPALIVE_STREAMS:-16}
KEEPALIVE_WINDOW=${KEEPALIVE_WINDOW:-64}
PORT_BASE=${PORT_BASE:-21000}
KEEP=${KEEP:-0}
KEEL=${KEEL:-$root/target/release/keel}
KEELD=${KEELD:-$root/target/release/keeld}
KEELD_B=${KEELD_B:-}
ETCD=${ETCD:-$(command -v etcd || true)}
BENCH_DIR=${KEEL_BENCH_DIR:-$root/target/tmp}

prog=compare-etcd
# shellcheck source=bench/cluster.sh
. "$root/bench/cluster.sh"

# ---- what is needed, and how to get it -------------------------------------------------------

check_binaries
[[ -z $KEELD_B || -x $KEELD_B ]] || die "KEELD_B=$KEELD_B is not an executable"
for knob in DURATION WARMUP; do
    [[ ${!knob} =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "$knob='${!knob}' is not a number of seconds"
done
for knob in REPS PRELOAD VALUE_SIZE CONNS PORT_BASE HISTORY HISTORY_KEYS WATCH_RATE WATCH_STREAMS \
    KEEPALIVE_STREAMS KEEPALIVE_WINDOW; do
    [[ ${!knob} =~ ^[0-9]+$ ]] || die "$knob='${!knob}' is not a whole number"
done
((REPS >= 1 && PRELOAD >= 1)) || die "REPS and PRELOAD must be at least 1"
((HISTORY >= 1 && HISTORY_KEYS >= 1 && WATCH_RATE >= 1 && WATCH_STREAMS >= 1)) ||
    die "HISTORY, HISTORY_KEYS, WATCH_RATE and WATCH_STREAMS must be at least 1"
((KEEPALIVE_STREAMS >= 1 && KEEPALIVE_WINDOW >= 1)) || die "KEEPALIVE_STREAMS and KEEPALIVE_WINDOW must be at least 1"

min() { echo $(($1 < $2 ? $1 : $2)); }

# One row of the matrix: name -> the `keel bench` flags of its load. `watch-N` is any N watchers,
# `lease-N` and `lock-N` any N clients, `keepalive-N` any N leases; `lease` is `lease-64` and
# `keepalive` is `keepalive-10000`.
row_args() {
    local op consistency clients
    case $1 in
        lease) row_args lease-64; return ;;
        keepalive) row_args keepalive-10000; return ;;
        lease-* | lock-*)
            # lease: each client grants a lease and revokes it, one op per pair. lock: the
            # clients contend for one lock (v3lockpb.Lock), one op per Lock+Unlock.
            op=${1%%-*} clients=${1#*-}
            [[ $clients =~ ^[1-9][0-9]*$ ]] || return 1
            echo "--op $op --clients $clients --conns $(min "$clients" "$CONNS")"
            return ;;
        keepalive-*)
            # N leases granted first (not measured), kept alive over KEEPALIVE_STREAMS streams,
            # KEEPALIVE_WINDOW requests in flight on each; revoked after.
            local leases=${1#keepalive-} streams
            [[ $leases =~ ^[1-9][0-9]*$ ]] || return 1
            streams=$(min "$leases" "$KEEPALIVE_STREAMS")
            echo "--op keepalive --leases $leases --clients $streams --conns $(min "$streams" "$CONNS") --window $KEEPALIVE_WINDOW"
            return ;;
        put-1) read -r op consistency clients <<<"put linearizable 1" ;;
        put-64) read -r op consistency clients <<<"put linearizable 64" ;;
        put-256) read -r op consistency clients <<<"put linearizable 256" ;;
        get-l-1) read -r op consistency clients <<<"get linearizable 1" ;;
        get-l-64) read -r op consistency clients <<<"get linearizable 64" ;;
        get-s-64) read -r op consistency clients <<<"get serializable 64" ;;
        put-hist)
            # Puts at 64 clients after HISTORY more puts cycling over HISTORY_KEYS keys: history
            # holds HISTORY revisions of them (nothing compacts), and the measured puts add to it.
            echo "--op put --clients 64 --conns $(min 64 "$CONNS") --preload $HISTORY --key-space $HISTORY_KEYS"
            return ;;
        watch-*)
            local watchers=${1#watch-} streams
            [[ $watchers =~ ^[1-9][0-9]*$ ]] || return 1
            streams=$(min "$watchers" "$WATCH_STREAMS")
            # At most a second of puts in flight: the rate holds unless a put takes over a second.
            echo "--op watch --watchers $watchers --streams $streams --conns $(min "$streams" "$CONNS") --rate $WATCH_RATE --clients $WATCH_RATE"
            return ;;
        *) return 1 ;;
    esac
    echo "--op $op --consistency $consistency --clients $clients --conns $(min "$clients" "$CONNS") --key-space $PRELOAD"
}

# A row's name in the tables.
row_label() {
    case $1 in
        put-hist) echo "put, $HISTORY revs (64)" ;;
        lease) row_label lease-64 ;;
        keepalive) row_label keepalive-10000 ;;
        lease-*) echo "lease grant+revoke (${1#lease-})" ;;
        lock-*) echo "lock+unlock (${1#lock-})" ;;
        keepalive-*) echo "keepalive, ${1#keepalive-} leases ($(min "${1#keepalive-}" "$KEEPALIVE_STREAMS"))" ;;
        watch-*) echo "watch (${1#watch-})" ;;
        get-s-*) echo "get serializable (${1##*-})" ;;
        get-l-*) echo "get linearizable (${1##*-})" ;;
        *) echo "${1%%-*} (${1##*-})" ;;
    esac
}
for row in $ROWS; do row_args "$row" >/dev/null || die "unknown row '$row' in ROWS"; done

mkdir -p "$BENCH_DIR"
work=$(mktemp -d "$BENCH_DIR/compare-etcd.XXXXXX")
RESULTS=${RESULTS:-$BENCH_DIR/compare-etcd-$(date +%Y%m%d-%H%M%S).jsonl}
: >"$RESULTS"
cleanup_more() { [[ -s $RESULTS ]] || rm -f "$RESULTS"; }
cluster_init

failed=() # "system rep row" of each run that gave no result

# CPU seconds (user + system) and bytes written to storage so far, summed over the running
# cluster's members: "ticks bytes" (/proc/PID/stat fields 14 and 15, /proc/PID/io write_bytes).
server_usage() {
    local pid ticks=0 bytes=0 stat io
    for pid in "${pids[@]}"; do
        stat=$(<"/proc/$pid/stat") || continue
        stat=${stat##*) } # after the command name, which may hold spaces
        read -ra f <<<"$stat"
        ticks=$((ticks + f[11] + f[12]))
        io=$(grep '^write_bytes:' "/proc/$pid/io") || continue
        bytes=$((bytes + ${io#write_bytes: }))
    done
    echo "$ticks $bytes"
}
clk_tck=$(getconf CLK_TCK)

bench() { # system rep row
    local system=$1 rep=$2 row=$3 line args before after
    read -ra args <<<"$(row_args "$row")"
    : >"$work/run.log"
    read -ra before <<<"$(server_usage)"
    if run_child "$work/line.json" "$work/run.log" \
        keel_to "$system" --timeout 5 bench --json --target-leader \
        "${args[@]}" --value-size "$VALUE_SIZE" --duration "$DURATION" --warmup "$WARMUP"; then
        read -ra after <<<"$(server_usage)"
        line=$(<"$work/line.json")
        # Per op, over the whole run: the warm-up's ops are counted at the measured rate.
        local ops cpu_ms disk
        ops=$(awk -v r="$(field ops_per_s "$line")" -v d="$DURATION" -v w="$WARMUP" 'BEGIN { print r * (d + w) }')
        cpu_ms=$(awk -v t=$((after[0] - before[0])) -v hz="$clk_tck" -v n="$ops" 'BEGIN { printf "%.3f", (n > 0 ? t / hz * 1e6 / n : 0) }')
        disk=$(awk -v b=$((after[1] - before[1])) -v n="$ops" 'BEGIN { printf "%.0f", (n > 0 ? b / n : 0) }')
        line="${line%\}},\"server_cpu_ms_per_kop\":$cpu_ms,\"server_disk_bytes_per_op\":$disk}"
        echo "{\"system\":\"$system\",\"rep\":$rep,\"row\":\"$row\",${line#\{}" >>"$RESULTS"
        if [[ $row == watch-* ]]; then
            note "$system rep $rep $row: $(field events_per_s "$line") events/s, p50 $(field p50_us "$line") µs, p99 $(field p99_us "$line") µs, $(field missed "$line") missed, $(field errors "$line") errors"
        else
            note "$system rep $rep $row: $(field ops_per_s "$line") ops/s, p99 $(field p99_us "$line") µs, $(field errors "$line") errors"
        fi
    else
        failed+=("$system rep $rep $row")
        note "$system rep $rep $row: FAILED, no result (the end of its output is below)"
        tail -n 5 "$work/run.log" >&2
    fi
    cat "$work/run.log" >>"$work/bench.log"
    check_alive "$system" "$rep"
}

measure() { # system rep
    local system=$1 rep=$2
    start_cluster "$system" "$rep"
    local started=$SECONDS
    run_child /dev/null "$work/bench.log" \
        keel_to "$system" --timeout 5 bench --target-leader --op put --clients 1 \
        --preload "$PRELOAD" --key-space "$PRELOAD" --value-size "$VALUE_SIZE" --ops 1 --warmup 0 || die "$system: preload failed (see $work/bench.log; KEEP=1 keeps it)"
    note "$system rep $rep: preloaded $PRELOAD keys in $((SECONDS - started)) s"
    for row in $ROWS; do bench "$system" "$rep" "$row"; done
    stop_cluster
    rm -rf "${work:?}/$system-$rep"
}

field() { # name json-line -> value
    sed -nE "s/.*\"$1\":([0-9.eE+-]+).*/\1/p" <<<"$2"
}

median() { # numbers on stdin -> median (mean of the middle two for an even count)
    sort -g | awk '{v[NR]=$1} END {if (NR==0) print "-"; else if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'
}

# ---- the run --------------------------------------------------------------------------------

note "etcd: $("$ETCD" --version | sed -n 1p), keeld: $("$KEELD" --version)"
note "matrix: $ROWS; ${DURATION}s each after ${WARMUP}s warm-up, $REPS repetition(s), $PRELOAD keys, ${VALUE_SIZE}-byte values"
load_before=$(uptime)
systems="etcd keel"
((TLS)) && systems="etcd keel keel-plain"
[[ -n $KEELD_B ]] && systems+=" keel-b"
for rep in $(seq "$REPS"); do
    # Alternate the order, so drift in the machine's speed affects every system alike.
    if ((rep % 2)); then order=$systems; else order=$(tr ' ' '\n' <<<"$systems" | tac | tr '\n' ' '); fi
    for system in $order; do measure "$system" "$rep"; done
done
load_after=$(uptime)

# The runs of a row (of one system): none if every one failed.
runs() { # row [system]
    grep "\"system\":\"${2:-[a-z-]*}\",\"rep\":[0-9]*,\"row\":\"$1\"," "$RESULTS" || true
}
med() { # system row field
    runs "$2" "$1" | while read -r line; do field "$3" "$line"; done | median
}
num() { awk -v x="$1" -v d="$2" -v p="$3" 'BEGIN { if (x == "-") print "-"; else printf "%.*f", p, x / d }'; }
ms() { if [[ $1 == - ]]; then echo -; else echo "$(num "$1" 1000 1) ms"; fi; } # µs -> ms
ratio() { awk -v k="$1" -v e="$2" 'BEGIN { if (k == "-" || e == "-" || e == 0) print "-"; else printf "%.2f", k / e }'; }

total() { # row field -> sum over both systems and all runs
    runs "$1" | while read -r line; do field "$2" "$line"; done | awk '{s+=$1} END {print s+0}'
}
kv_rows="" watch_rows=""
for row in $ROWS; do
    if [[ $row == watch-* ]]; then watch_rows+=" $row"; else kv_rows+=" $row"; fi
done

# With --tls, one more column: Keel's median with TLS over its median in plaintext (same rows,
# same run), TLS/PLAIN; below 1 is what TLS costs.
# With KEELD_B, one more: keel-b's median over keel's.
tls_col="" tls_head=()
if ((TLS)); then tls_col=" %9s" tls_head=("TLS/PLAIN"); fi
if [[ -n $KEELD_B ]]; then tls_col+=" %7s" tls_head+=("B/KEEL"); fi
tls_cell() { # row field keel-median -> the TLS/PLAIN and B/KEEL cells, or nothing
    if ((TLS)); then ratio "$3" "$(med keel-plain "$1" "$2")"; fi
    if [[ -n $KEELD_B ]]; then ratio "$(med keel-b "$1" "$2")" "$3"; fi
    return 0
}

echo
echo "Keel vs etcd: medians of $REPS run(s), ${DURATION}s each, 3 members on loopback, leader-targeted, ${VALUE_SIZE}-byte values, $PRELOAD keys$( ((TLS)) && echo ", TLS on both ports (client certificates required)")"
if [[ -n $kv_rows ]]; then
    fmt="%-30s %10s %10s %6s %11s %11s %6s %9s %9s %8s %8s %7s${tls_col}\n"
    # shellcheck disable=SC2059 # the format is ours
    printf "$fmt" "ROW (clients)" "ETCD OPS/S" "KEEL OPS/S" "RATIO" "ETCD P99" "KEEL P99" "RATIO" \
        "ETCD CPU" "KEEL CPU" "ETCD B/OP" "KEEL B/OP" "ERRORS" "${tls_head[@]}"
    for row in $kv_rows; do
        eo=$(med etcd "$row" ops_per_s) ko=$(med keel "$row" ops_per_s)
        ep=$(med etcd "$row" p99_us) kp=$(med keel "$row" p99_us)
        # shellcheck disable=SC2059
        printf "$fmt" "$(row_label "$row")" "$(num "$eo" 1 0)" "$(num "$ko" 1 0)" "$(ratio "$ko" "$eo")" \
            "$(ms "$ep")" "$(ms "$kp")" "$(ratio "$kp" "$ep")" \
            "$(num "$(med etcd "$row" server_cpu_ms_per_kop)" 1 0)" "$(num "$(med keel "$row" server_cpu_ms_per_kop)" 1 0)" \
            "$(med etcd "$row" server_disk_bytes_per_op)" "$(med keel "$row" server_disk_bytes_per_op)" \
            "$(total "$row" errors)" $(tls_cell "$row" ops_per_s "$ko")
    done
    if [[ $kv_rows =~ (lease|keepalive|lock) ]]; then
        echo "lease grant+revoke: one op is a LeaseGrant and its LeaseRevoke; keepalive: one op is a keep-alive answered with a TTL (streams in parentheses);"
        echo "lock+unlock: one op is a v3lockpb Lock and its Unlock, all clients contending for one lock"
    fi
fi
if [[ -n $watch_rows ]]; then
    echo
    echo "Watch: N watchers on one prefix, puts under it at $WATCH_RATE/s; events/s over all watchers; latency from a put's send to a watcher's receipt"
    fmt="%-24s %10s %10s %6s %11s %11s %6s %11s %11s %6s %7s %7s${tls_col}\n"
    # shellcheck disable=SC2059
    printf "$fmt" "ROW (watchers)" "ETCD EV/S" "KEEL EV/S" "RATIO" "ETCD P50" "KEEL P50" "RATIO" \
        "ETCD P99" "KEEL P99" "RATIO" "MISSED" "ERRORS" "${tls_head[@]}"
    for row in $watch_rows; do
        eo=$(med etcd "$row" events_per_s) ko=$(med keel "$row" events_per_s)
        e50=$(med etcd "$row" p50_us) k50=$(med keel "$row" p50_us)
        e99=$(med etcd "$row" p99_us) k99=$(med keel "$row" p99_us)
        # shellcheck disable=SC2059
        printf "$fmt" "$(row_label "$row")" "$(num "$eo" 1 0)" "$(num "$ko" 1 0)" "$(ratio "$ko" "$eo")" \
            "$(ms "$e50")" "$(ms "$k50")" "$(ratio "$k50" "$e50")" \
            "$(ms "$e99")" "$(ms "$k99")" "$(ratio "$k99" "$e99")" \
            "$(total "$row" missed)" "$(total "$row" errors)" $(tls_cell "$row" events_per_s "$ko")
    done
fi
echo "ratios are Keel/etcd: ops/s and events/s above 1, latencies below 1 favour Keel; missed and errors: every system, all runs"
[[ -n $kv_rows ]] && echo "CPU: CPU ms (user + system) per 1,000 ops, summed over the 3 server processes; B/OP: bytes they wrote to storage per op (/proc/PID/io)"
((TLS)) && echo "TLS/PLAIN is Keel with TLS over Keel in plaintext (keel-plain, same run): ops/s or events/s; 1 means TLS costs nothing"
[[ -n $KEELD_B ]] && echo "B/KEEL is KEELD_B=$KEELD_B over KEELD=$KEELD (keel-b and keel, same run): ops/s or events/s"
echo "load before: $load_before"
echo "load after:  $load_after"
echo "every run: $RESULTS"
if ((${#failed[@]})); then
    echo "FAILED, no result (a row without any shows '-'; the errors are above):"
    printf '  %s\n' "${failed[@]}"
    exit 1
fi
