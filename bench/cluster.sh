# Sourced by bench/compare-etcd.sh, bench/disk-per-put.sh and bench/lease-restart.sh: start, wait
# for and stop a 3-member (or `size`-member) etcd or Keel cluster on loopback, and stop every
# process started when the script ends.
#
# The sourcing script sets prog (its name, for messages), PORT_BASE, KEEP, ETCD, KEEL and KEELD,
# then, once it has made `work` (a fresh directory for the data dirs and logs), calls
# cluster_init. It may set size (members per cluster, 1 to 9; 3 if unset) and define
# cleanup_more, run at exit. Starting a cluster again with the same rep restarts it on its data
# dirs (both systems ignore their founding flags once a data dir holds a cluster).

size=${size:-3}
# TLS=1: every system but `keel-plain` with TLS on both ports and client certificates required on
# both (etcd's flags, which keeld shares), certificates from `keel certs` made by cluster_init in
# $work/certs; the keel commands get --cacert/--cert/--key through keel_to.
TLS=${TLS:-0}

die() { echo "$prog: $*" >&2; exit 2; }
note() { echo "$prog: $*" >&2; }

# The binaries, and how to get them.
check_binaries() {
    [[ -n $ETCD && -x $ETCD ]] ||
        die "etcd not found: install it with 'apt-get install etcd-server' (Debian, /usr/bin/etcd) or set ETCD=/path/to/etcd"
    for bin in "$KEEL" "$KEELD"; do
        [[ -x $bin ]] ||
            die "$bin not found: build it with 'cargo build --release -p keel-cli -p keel-kv' (or set KEEL=, KEELD=)"
    done
}

# ---- processes: every one started is tracked by pid and stopped on exit ----------------------

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

forced=0 # set by stop_cluster: 1 if members outlived the grace and were killed

stop_cluster() { # [grace seconds, default 10] [signal, default TERM]
    forced=0
    ((${#pids[@]})) || return 0
    kill "-${2:-TERM}" "${pids[@]}" 2>/dev/null || true
    # Give the members time to stop in order (etcd takes about 7 s when all stop at once), then
    # kill what is left. Polls: the members are this shell's children, but `wait` has no timeout.
    # (Quiet: bash reports each member a signal ended, "Killed", as it notices.)
    {
        for _ in $(seq $((${1:-10} * 10))); do
            local alive=0
            for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
            ((alive)) || break
            sleep 0.1
        done
    } 2>/dev/null
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && forced=1; done
    kill -KILL "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
    pids=()
}

cleanup() {
    [[ -n $child ]] && kill -TERM "$child" 2>/dev/null
    # After an interruption nobody waits for an orderly stop of throwaway clusters.
    stop_cluster "$((interrupted ? 1 : 10))"
    if [[ $KEEP == 1 ]]; then note "kept $work"; else rm -rf "$work"; fi
    if declare -F cleanup_more >/dev/null; then cleanup_more; fi
}
interrupted=0

# From here on, everything started is stopped when the script ends.
cluster_init() {
    trap cleanup EXIT
    trap 'interrupted=1; note "interrupted"; exit 130' INT
    trap 'interrupted=1; exit 143' TERM
    if [[ $(stat -f -c %T "$work") == tmpfs ]]; then
        note "warning: $work is on tmpfs, where fsync does nothing; set KEEL_BENCH_DIR to a disk"
    fi
    if [[ $TLS == 1 ]]; then make_certs; fi
}

# ---- TLS ------------------------------------------------------------------------------------

certs=""
# A CA, member i's certificate m<i> (server and client, 127.0.0.1 and localhost: its client
# port, its peer port and dialing its peers, for either system) and root's client certificate.
make_certs() {
    certs=$work/certs
    "$KEEL" certs init --dir "$certs" >/dev/null
    for i in $(seq "$size"); do
        "$KEEL" certs node "m$i" --dir "$certs" --host 127.0.0.1 --host localhost >/dev/null
    done
    "$KEEL" certs client root --dir "$certs" >/dev/null
    note "TLS on both ports, client certificates required: certificates in $certs"
}

tls_on() { [[ $TLS == 1 && $1 != *-plain ]]; } # system
scheme() { if tls_on "$1"; then echo https; else echo http; fi; }

# Member i's TLS flags, etcd's names (keeld takes the same).
member_tls_flags() { # system i
    tls_on "$1" || return 0
    local cert=$certs/m$2.pem key=$certs/m$2-key.pem ca=$certs/ca.pem
    echo "--cert-file $cert --key-file $key --trusted-ca-file $ca --client-cert-auth" \
        "--peer-cert-file $cert --peer-key-file $key --peer-trusted-ca-file $ca --peer-client-cert-auth"
}

# Runs keel against SYSTEM's members: `keel --endpoints <its endpoints> [TLS flags] ARGS...`.
keel_to() { # system args...
    local system=$1
    shift
    if tls_on "$system"; then
        "$KEEL" --endpoints "$(endpoints "$system")" \
            --cacert "$certs/ca.pem" --cert "$certs/root.pem" --key "$certs/root-key.pem" "$@"
    else
        "$KEEL" --endpoints "$(endpoints "$system")" "$@"
    fi
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Ports: etcd member i: client PORT_BASE+10i, peer +1; Keel node i: PORT_BASE+100+10i, peer +1;
# Keel in plaintext beside a TLS run (`keel-plain`): PORT_BASE+200+10i, peer +1; a second keeld
# binary (`keel-b`, compare-etcd's KEELD_B): PORT_BASE+300+10i, peer +1.
client_port() {
    local offset=0
    [[ $1 == keel ]] && offset=100
    [[ $1 == keel-plain ]] && offset=200
    [[ $1 == keel-b ]] && offset=300
    echo $((PORT_BASE + offset + 10 * $2))
}
peer_port() { echo $(($(client_port "$1" "$2") + 1)); }
endpoints() {
    local list="" i
    for i in $(seq "$size"); do list+="${list:+,}$(scheme "$1")://127.0.0.1:$(client_port "$1" "$i")"; done
    echo "$list"
}

# Member i's state: etcd's member dir, Keel's data dir.
state_dir() { # system rep i
    if [[ $1 == etcd ]]; then echo "$work/etcd-$2/e$3/member"; else echo "$work/$1-$2/n$3"; fi
}

start_etcd() {
    local dir=$work/etcd-$1 cluster="" i s
    s=$(scheme etcd)
    for i in $(seq "$size"); do cluster+="${cluster:+,}e$i=$s://127.0.0.1:$(peer_port etcd "$i")"; done
    for i in $(seq "$size"); do
        local c=$s://127.0.0.1:$(client_port etcd "$i") p=$s://127.0.0.1:$(peer_port etcd "$i") tls
        read -ra tls <<<"$(member_tls_flags etcd "$i")"
        mkdir -p "$dir"
        "$ETCD" --name "e$i" --data-dir "$dir/e$i" "${tls[@]}" \
            --listen-client-urls "$c" --advertise-client-urls "$c" \
            --listen-peer-urls "$p" --initial-advertise-peer-urls "$p" \
            --initial-cluster "$cluster" --initial-cluster-token keel-compare --initial-cluster-state new \
            >>"$dir/e$i.log" 2>&1 &
        pids+=($!)
    done
}

start_keel() { # rep [system: keel, keel-plain or keel-b]
    local system=${2:-keel}
    local dir=$work/$system-$1 cluster="" i keeld=$KEELD
    [[ $system == keel-b ]] && keeld=$KEELD_B
    for i in $(seq "$size"); do cluster+="${cluster:+,}$i=127.0.0.1:$(peer_port "$system" "$i")"; done
    for i in $(seq "$size"); do
        local tls
        read -ra tls <<<"$(member_tls_flags "$system" "$i")"
        mkdir -p "$dir"
        "$keeld" --id "$i" --data-dir "$dir/n$i" "${tls[@]}" \
            --client-addr "127.0.0.1:$(client_port "$system" "$i")" --peer-addr "127.0.0.1:$(peer_port "$system" "$i")" \
            --initial-cluster "$cluster" >>"$dir/n$i.log" 2>&1 &
        pids+=($!)
    done
}

# Starts the members of SYSTEM in fresh data dirs, after checking that their ports are free.
start_cluster() { # system rep
    for i in $(seq "$size"); do
        for port in $(client_port "$1" "$i") $(peer_port "$1" "$i"); do
            port_free "$port" || die "port $port is in use (set PORT_BASE)"
        done
    done
    note "$1 rep $2: starting $size member(s)$(tls_on "$1" && echo ", TLS")"
    if [[ $1 == keel-* ]]; then start_keel "$2" "$1"; else "start_$1" "$2"; fi
    wait_ready "$1" "$2"
}

# Ready: a leader answers a linearizable read. Polls for at most 60 s, and stops early if a
# member died.
wait_ready() {
    local system=$1 rep=$2
    for _ in $(seq 120); do
        if run_child /dev/null /dev/null keel_to "$system" --timeout 1 bench --target-leader \
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
