#!/usr/bin/env bash
# Keel against etcd: the same `keel bench` matrix (etcd v3 gRPC) against a 3-member etcd and a
# 3-node Keel on loopback, one cluster running at a time, and one table of medians with the
# Keel/etcd ratios. See bench/README.md ("Keel against etcd").
#
# Installs nothing. Needs: etcd (Debian: apt-get install etcd-server), and the release builds of
# keel and keeld (cargo build --release -p keel-cli -p keel-kv).
#
# Knobs (environment): DURATION=10 REPS=3 PRELOAD=100000 WARMUP=1 VALUE_SIZE=256 CONNS=8
# ROWS="put-1 put-64 put-256 get-l-1 get-l-64 get-s-64" PORT_BASE=21000 KEEP=0
# KEEL=target/release/keel KEELD=target/release/keeld ETCD=$(command -v etcd)
# KEEL_BENCH_DIR=target/tmp (data dirs; not tmpfs, or fsync costs nothing) RESULTS=<file.jsonl>
# Quick run: DURATION=2 REPS=1 PRELOAD=10000 bench/compare-etcd.sh

set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

DURATION=${DURATION:-10}
REPS=${REPS:-3}
PRELOAD=${PRELOAD:-100000}
WARMUP=${WARMUP:-1}
VALUE_SIZE=${VALUE_SIZE:-256}
CONNS=${CONNS:-8}
ROWS=${ROWS:-put-1 put-64 put-256 get-l-1 get-l-64 get-s-64}
PORT_BASE=${PORT_BASE:-21000}
KEEP=${KEEP:-0}
KEEL=${KEEL:-$root/target/release/keel}
KEELD=${KEELD:-$root/target/release/keeld}
ETCD=${ETCD:-$(command -v etcd || true)}
BENCH_DIR=${KEEL_BENCH_DIR:-$root/target/tmp}

die() { echo "compare-etcd: $*" >&2; exit 2; }
note() { echo "compare-etcd: $*" >&2; }

# ---- what is needed, and how to get it -------------------------------------------------------

[[ -n $ETCD && -x $ETCD ]] ||
    die "etcd not found: install it with 'apt-get install etcd-server' (Debian, /usr/bin/etcd) or set ETCD=/path/to/etcd"
for bin in "$KEEL" "$KEELD"; do
    [[ -x $bin ]] ||
        die "$bin not found: build it with 'cargo build --release -p keel-cli -p keel-kv' (or set KEEL=, KEELD=)"
done
for knob in DURATION WARMUP; do
    [[ ${!knob} =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "$knob='${!knob}' is not a number of seconds"
done
for knob in REPS PRELOAD VALUE_SIZE CONNS PORT_BASE; do
    [[ ${!knob} =~ ^[0-9]+$ ]] || die "$knob='${!knob}' is not a whole number"
done
((REPS >= 1 && PRELOAD >= 1)) || die "REPS and PRELOAD must be at least 1"

# One row of the matrix: name -> "op consistency clients".
row_spec() {
    case $1 in
        put-1) echo "put linearizable 1" ;;
        put-64) echo "put linearizable 64" ;;
        put-256) echo "put linearizable 256" ;;
        get-l-1) echo "get linearizable 1" ;;
        get-l-64) echo "get linearizable 64" ;;
        get-s-64) echo "get serializable 64" ;;
        *) return 1 ;;
    esac
}
for row in $ROWS; do row_spec "$row" >/dev/null || die "unknown row '$row' in ROWS"; done

# ---- processes: every one started is tracked by pid and stopped on exit ----------------------

mkdir -p "$BENCH_DIR"
work=$(mktemp -d "$BENCH_DIR/compare-etcd.XXXXXX")
RESULTS=${RESULTS:-$BENCH_DIR/compare-etcd-$(date +%Y%m%d-%H%M%S).jsonl}
: >"$RESULTS"
pids=()  # the running cluster's members
child="" # the running keel command

# Runs a command in the background, stdout to OUT and stderr appended to ERR, and waits for it: a
# signal to this script is then handled at once (bash defers traps until a foreground command
# ends), and cleanup can stop the command.
run_child() { # OUT ERR command...
    local out=$1 err=$2
    shift 2
    "$@" >"$out" 2>>"$err" &
    child=$!
    local rc=0
    wait "$child" || rc=$?
    child=""
    return "$rc"
}

stop_cluster() { # [grace seconds, default 10]
    ((${#pids[@]})) || return 0
    kill -TERM "${pids[@]}" 2>/dev/null || true
    # Give the members time to stop in order (etcd takes about 7 s when all stop at once), then
    # kill what is left.
    for _ in $(seq $((${1:-10} * 10))); do
        local alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
    pids=()
}

cleanup() {
    [[ -n $child ]] && kill -TERM "$child" 2>/dev/null
    # After an interruption nobody waits for an orderly stop of throwaway clusters.
    stop_cluster "$((interrupted ? 1 : 10))"
    if [[ $KEEP == 1 ]]; then note "kept $work"; else rm -rf "$work"; fi
    [[ -s $RESULTS ]] || rm -f "$RESULTS"
}
interrupted=0
trap cleanup EXIT
trap 'interrupted=1; note "interrupted"; exit 130' INT
trap 'interrupted=1; exit 143' TERM

if [[ $(stat -f -c %T "$work") == tmpfs ]]; then
    note "warning: $work is on tmpfs, where fsync does nothing; set KEEL_BENCH_DIR to a disk"
fi

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Ports: etcd member i: client PORT_BASE+10i, peer +1; Keel node i: PORT_BASE+100+10i, peer +1.
client_port() {
    local offset=0
    [[ $1 == keel ]] && offset=100
    echo $((PORT_BASE + offset + 10 * $2))
}
peer_port() { echo $(($(client_port "$1" "$2") + 1)); }
endpoints() { echo "127.0.0.1:$(client_port "$1" 1),127.0.0.1:$(client_port "$1" 2),127.0.0.1:$(client_port "$1" 3)"; }

start_etcd() {
    local dir=$work/etcd-$1 cluster=""
    for i in 1 2 3; do cluster+="${cluster:+,}e$i=http://127.0.0.1:$(peer_port etcd "$i")"; done
    for i in 1 2 3; do
        local c=http://127.0.0.1:$(client_port etcd "$i") p=http://127.0.0.1:$(peer_port etcd "$i")
        mkdir -p "$dir"
        "$ETCD" --name "e$i" --data-dir "$dir/e$i" \
            --listen-client-urls "$c" --advertise-client-urls "$c" \
            --listen-peer-urls "$p" --initial-advertise-peer-urls "$p" \
            --initial-cluster "$cluster" --initial-cluster-token keel-compare --initial-cluster-state new \
            >"$dir/e$i.log" 2>&1 &
        pids+=($!)
    done
}

start_keel() {
    local dir=$work/keel-$1 cluster=""
    for i in 1 2 3; do cluster+="${cluster:+,}$i=127.0.0.1:$(peer_port keel "$i")"; done
    for i in 1 2 3; do
        mkdir -p "$dir"
        "$KEELD" --id "$i" --data-dir "$dir/n$i" \
            --client-addr "127.0.0.1:$(client_port keel "$i")" --peer-addr "127.0.0.1:$(peer_port keel "$i")" \
            --initial-cluster "$cluster" >"$dir/n$i.log" 2>&1 &
        pids+=($!)
    done
}

# Ready: a leader answers a linearizable read. Polls for at most 60 s, and stops early if a
# member died.
wait_ready() {
    local system=$1 rep=$2 eps
    eps=$(endpoints "$system")
    for _ in $(seq 120); do
        if run_child /dev/null /dev/null "$KEEL" --endpoints "$eps" --timeout 1 bench --target-leader \
            --op get --key-space 1 --ops 1 --warmup 0; then
            return 0
        fi
        check_alive "$system" "$rep"
        sleep 0.5
    done
    tail -n 20 "$work/$system-$rep"/*.log >&2
    die "$system did not elect a leader within 60 s"
}

check_alive() { # system rep
    for pid in "${pids[@]}"; do
        kill -0 "$pid" 2>/dev/null || { tail -n 20 "$work/$1-$2"/*.log >&2; die "$1: a member exited (its log is above)"; }
    done
}

bench() { # system rep row
    local system=$1 rep=$2 row=$3 op consistency clients conns line
    read -r op consistency clients <<<"$(row_spec "$row")"
    conns=$((clients < CONNS ? clients : CONNS))
    if run_child "$work/line.json" "$work/bench.log" \
        "$KEEL" --endpoints "$(endpoints "$system")" --timeout 5 bench --json --target-leader \
        --op "$op" --consistency "$consistency" --clients "$clients" --conns "$conns" \
        --key-space "$PRELOAD" --value-size "$VALUE_SIZE" --duration "$DURATION" --warmup "$WARMUP"; then
        line=$(<"$work/line.json")
        echo "{\"system\":\"$system\",\"rep\":$rep,\"row\":\"$row\",${line#\{}" >>"$RESULTS"
        note "$system rep $rep $row: $(field ops_per_s "$line") ops/s, p99 $(field p99_us "$line") µs, $(field errors "$line") errors"
    else
        note "$system rep $rep $row: failed (see below)"
        tail -n 5 "$work/bench.log" >&2
    fi
    check_alive "$system" "$rep"
}

measure() { # system rep
    local system=$1 rep=$2
    for i in 1 2 3; do
        for port in $(client_port "$system" "$i") $(peer_port "$system" "$i"); do
            port_free "$port" || die "port $port is in use (set PORT_BASE)"
        done
    done
    note "$system rep $rep: starting 3 members"
    "start_$system" "$rep"
    wait_ready "$system" "$rep"
    local started=$SECONDS
    run_child /dev/null "$work/bench.log" \
        "$KEEL" --endpoints "$(endpoints "$system")" --timeout 5 bench --target-leader --op put --clients 1 \
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
for rep in $(seq "$REPS"); do
    # Alternate which system goes first, so drift in the machine's speed affects both alike.
    if ((rep % 2)); then order="etcd keel"; else order="keel etcd"; fi
    for system in $order; do measure "$system" "$rep"; done
done
load_after=$(uptime)

med() { # system row field
    grep "\"system\":\"$1\",\"rep\":[0-9]*,\"row\":\"$2\"," "$RESULTS" | while read -r line; do field "$3" "$line"; done | median
}
num() { awk -v x="$1" -v d="$2" -v p="$3" 'BEGIN { if (x == "-") print "-"; else printf "%.*f", p, x / d }'; }
ratio() { awk -v k="$1" -v e="$2" 'BEGIN { if (k == "-" || e == "-" || e == 0) print "-"; else printf "%.2f", k / e }'; }

echo
echo "Keel vs etcd: medians of $REPS run(s), ${DURATION}s each, 3 members on loopback, leader-targeted, ${VALUE_SIZE}-byte values, $PRELOAD keys"
fmt="%-24s %10s %10s %6s %11s %11s %6s %7s\n"
# shellcheck disable=SC2059 # the format is ours
printf "$fmt" "ROW (clients)" "ETCD OPS/S" "KEEL OPS/S" "RATIO" "ETCD P99" "KEEL P99" "RATIO" "ERRORS"
for row in $ROWS; do
    read -r op consistency clients <<<"$(row_spec "$row")"
    if [[ $op == put ]]; then label="put ($clients)"; else label="get $consistency ($clients)"; fi
    eo=$(med etcd "$row" ops_per_s) ko=$(med keel "$row" ops_per_s)
    ep=$(med etcd "$row" p99_us) kp=$(med keel "$row" p99_us)
    errors=$(grep "\"row\":\"$row\"," "$RESULTS" | while read -r line; do field errors "$line"; done | awk '{s+=$1} END {print s+0}')
    # shellcheck disable=SC2059
    printf "$fmt" "$label" "$(num "$eo" 1 0)" "$(num "$ko" 1 0)" "$(ratio "$ko" "$eo")" \
        "$(num "$ep" 1000 1) ms" "$(num "$kp" 1000 1) ms" "$(ratio "$kp" "$ep")" "$errors"
done
echo "ratios are Keel/etcd: ops/s above 1 and p99 below 1 favour Keel; errors: both systems, all runs"
echo "load before: $load_before"
echo "load after:  $load_after"
echo "every run: $RESULTS"
