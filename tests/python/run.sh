#!/usr/bin/env bash
# The python `etcd3` client against keeld with TLS and auth: a CA certificate and a user
# name/password (tests/python/etcd3_tls_auth.py says what is checked). Installs etcd3 from PyPI
# into a venv (cached under target/), makes certificates with `keel certs`, starts a 3-node
# cluster on loopback with TLS on both ports, sets up users and roles with etcdctl, runs the
# client, and stops the cluster. Needs the keeld and keel binaries built (target/debug) and
# etcdctl, python3 with venv. Run by scripts/test.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin="${CARGO_TARGET_DIR:-target}/debug"
venv="${CARGO_TARGET_DIR:-target}/python-etcd3-venv"
work="$(mktemp -d)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do
        kill -9 "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    if [ "${failed:-0}" = 1 ]; then
        for f in "$work"/n*.log; do echo "----- $f"; tail -n 40 "$f"; done
    fi
    rm -rf "$work"
}
trap 'failed=1; cleanup' ERR
trap cleanup EXIT

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "etcd3==0.12.0"
fi
# etcd3 0.12's generated code predates protobuf 4's C++ descriptors.
export PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python

"$bin/keel" certs init --dir "$work/certs" >/dev/null
for n in 1 2 3; do
    "$bin/keel" certs node "n$n" --dir "$work/certs" --host 127.0.0.1 --host localhost >/dev/null
done

# Ports outside the ephemeral range, by this shell's pid so parallel runs differ.
base=$((20000 + ($$ % 500) * 10))
cluster="1=127.0.0.1:$((base + 2)),2=127.0.0.1:$((base + 4)),3=127.0.0.1:$((base + 6))"
for n in 1 2 3; do
    c="$work/certs"
    "$bin/keeld" --id "$n" --data-dir "$work/n$n" \
        --client-addr "127.0.0.1:$((base + 2 * n - 1))" --peer-addr "127.0.0.1:$((base + 2 * n))" \
        --initial-cluster "$cluster" \
        --cert-file "$c/n$n.pem" --key-file "$c/n$n-key.pem" \
        --peer-cert-file "$c/n$n.pem" --peer-key-file "$c/n$n-key.pem" \
        --peer-trusted-ca-file "$c/ca.pem" >"$work/n$n.log" 2>&1 &
    pids+=($!)
done

ctl() { ETCDCTL_API=3 etcdctl --endpoints "https://127.0.0.1:$((base + 1))" --cacert "$work/certs/ca.pem" \
    --dial-timeout 2s --command-timeout 5s "$@"; }
for _ in $(seq 1 100); do
    ctl endpoint health >/dev/null 2>&1 && break
    sleep 0.2 # polling a condition (the cluster answers), bounded: 20 s
done
ctl endpoint health

ctl user add root:root-pw
ctl user grant-role root root
ctl user add alice:alice-pw
ctl role add app
ctl role grant-permission app readwrite --prefix=true app/
ctl user grant-role alice app
ctl auth enable

"$venv/bin/python" tests/python/etcd3_tls_auth.py 127.0.0.1 "$((base + 1))" "$work/certs/ca.pem"
