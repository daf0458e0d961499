#!/usr/bin/env bash
# Patroni (Debian's package) keeps a PostgreSQL primary elected through etcd's v3 API: two
# PostgreSQL members under Patroni with the DCS at ENDPOINT, then the primary's Patroni is
# SIGKILLed and the replica must be promoted (once the leader key's TTL runs out).
#
#   tests/patroni/run.sh keel    # a fresh single-node keeld ($CARGO_TARGET_DIR/debug/keeld, or $KEELD)
#   tests/patroni/run.sh etcd    # a fresh etcd 3.4, to show the harness is right
#
# Installs patroni and postgresql with apt when missing (needs root or sudo). PostgreSQL will not
# run as root: as root, the members run as the user `keeltest` (created if missing). Everything it
# starts is stopped on exit; ports 31900-31999 on loopback.
set -euo pipefail
cd "$(dirname "$0")/../.."
target=${1:?usage: tests/patroni/run.sh keel|etcd}
ttl=${PATRONI_TTL:-10}

need=()
command -v patroni >/dev/null || need+=(patroni)
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need+=(postgresql)
if ((${#need[@]})); then
    sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
bin_dir=$(dirname "$(ls /usr/lib/postgresql/*/bin/postgres | sort -V | tail -1)")

work=$(mktemp -d /tmp/keel-patroni.XXXXXX)
chmod 755 "$work"
as_user=()
if [ "$(id -u)" = 0 ]; then
    id keeltest >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin keeltest
    chown keeltest "$work"
    # setpriv execs (runuser would stay as the parent, and killing it would not kill Patroni).
    as_user=(setpriv --reuid=keeltest --regid=keeltest --init-groups)
fi
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    pkill -9 -f "patroni $work/" 2>/dev/null || true
    # Patroni's postmasters outlive a SIGKILLed Patroni: stop them by their data dirs.
    for d in "$work"/pg*/data; do
        [ -f "$d/postmaster.pid" ] && kill -9 "$(head -1 "$d/postmaster.pid")" 2>/dev/null || true
    done
    if [ "${failed:-1}" = 1 ]; then
        for f in "$work"/*.log; do echo "--- $f"; tail -30 "$f"; done
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap "exit 1" INT TERM

wait_for() { # what, seconds, command...
    local what=$1 secs=$2; shift 2
    local end=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= end)); then echo "FAIL: $what within ${secs}s" >&2; return 1; fi
        sleep 0.5
    done
}

client=127.0.0.1:31900
case "$target" in
keel)
    keeld=${KEELD:-${CARGO_TARGET_DIR:-target}/debug/keeld}
    [ -x "$keeld" ] || { echo "no keeld at $keeld: cargo build --bin keeld" >&2; exit 1; }
    "$keeld" --data-dir "$work/dcs" --client-addr $client --peer-addr 127.0.0.1:31901 >"$work/dcs.log" 2>&1 &
    pids+=($!)
    ;;
etcd)
    etcd --name e1 --data-dir "$work/dcs" --listen-client-urls http://$client --advertise-client-urls http://$client \
        --listen-peer-urls http://127.0.0.1:31901 --initial-advertise-peer-urls http://127.0.0.1:31901 \
        --initial-cluster e1=http://127.0.0.1:31901 >"$work/dcs.log" 2>&1 &
    pids+=($!)
    ;;
*) echo "usage: tests/patroni/run.sh keel|etcd" >&2; exit 2 ;;
esac
wait_for "the DCS ($target) to answer" 30 curl -sf http://$client/health

member() { # n → writes the config, starts Patroni
    local n=$1
    mkdir -p "$work/pg$n"
    cat >"$work/pg$n/patroni.yml" <<YAML
scope: keeltest
name: pg$n
restapi:
  listen: 127.0.0.1:3191$n
  connect_address: 127.0.0.1:3191$n
etcd3:
  hosts: $client
bootstrap:
  dcs:
    ttl: $ttl
    loop_wait: 1
    retry_timeout: 3
    maximum_lag_on_failover: 1048576
  initdb:
    - encoding: UTF8
  pg_hba:
    - host replication replicator 127.0.0.1/32 trust
    - host all all 127.0.0.1/32 trust
    - local all all trust
postgresql:
  listen: 127.0.0.1:3192$n
  connect_address: 127.0.0.1:3192$n
  data_dir: $work/pg$n/data
  bin_dir: $bin_dir
  pgpass: $work/pg$n/pgpass
  authentication:
    replication: {username: replicator, password: rep}
    superuser: {username: postgres, password: pg}
  parameters:
    unix_socket_directories: '$work/pg$n'
YAML
    [ ${#as_user[@]} = 0 ] || chown -R keeltest "$work/pg$n"
    "${as_user[@]}" patroni "$work/pg$n/patroni.yml" >"$work/pg$n.log" 2>&1 &
    pids+=($!)
    eval "patroni_$n=$!"
}
role() { curl -s http://127.0.0.1:3191"$1"/patroni | python3 -c 'import json,sys; print(json.load(sys.stdin)["role"])'; }
is_primary() { curl -sf -o /dev/null http://127.0.0.1:3191"$1"/primary; }
is_streaming_replica() { curl -sf -o /dev/null http://127.0.0.1:3191"$1"/replica; }

member 1
wait_for "pg1 to bootstrap and lead" 90 is_primary 1
member 2
wait_for "pg2 to stream from pg1" 90 is_streaming_replica 2
echo "pg1: $(role 1), pg2: $(role 2)"

kill -9 "$patroni_1"
echo "SIGKILLed pg1's Patroni; waiting for pg2 to take over (ttl ${ttl}s)"
start=$SECONDS
wait_for "pg2 to be promoted" $((ttl * 6)) is_primary 2
echo "pg2 promoted after $((SECONDS - start)) s"
echo "PASS: Patroni failed over on $target"
failed=0
