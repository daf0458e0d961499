#!/usr/bin/env bash
# OpenStack's etcd3gw client (2.7.0, from PyPI) against keeld's grpc-gateway JSON API: runs the
# client's own test suite (etcd3gw/tests, shipped in the package: its integration tests talk to
# localhost:$TOOZ_TEST_ETCD_PORT, its unit tests mock HTTP) against a single keeld, and, with
# --etcd, first against a single etcd 3.4 for the baseline. Installs etcd3gw, pytest and oslotest
# into a venv cached under target/. Needs keeld built (target/debug) and python3 with venv
# (and etcd for --etcd). Run by scripts/test.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin="${CARGO_TARGET_DIR:-target}/debug"
venv="${CARGO_TARGET_DIR:-target}/python-etcd3gw-venv"
with_etcd=0
[ "${1:-}" = "--etcd" ] && with_etcd=1
work="$(mktemp -d)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do
        kill -9 "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    if [ "${failed:-0}" = 1 ]; then
        for f in "$work"/*.log; do [ -f "$f" ] && { echo "----- $f"; tail -n 40 "$f"; }; done
    fi
    rm -rf "$work"
}
trap 'failed=1; cleanup' ERR
trap cleanup EXIT

if [ ! -x "$venv/bin/pytest" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "etcd3gw==2.7.0" "pytest" "oslotest"
fi
suite="$("$venv/bin/python" -c 'import etcd3gw.tests, os; print(os.path.dirname(etcd3gw.tests.__file__))')"

# Ports outside the ephemeral range, by this shell's pid so parallel runs differ.
base=$((25000 + ($$ % 500) * 10))

wait_health() {
    for _ in $(seq 1 100); do
        curl -sf "http://127.0.0.1:$1/health" >/dev/null 2>&1 && return 0
        sleep 0.2 # polling a condition (the server answers), bounded: 20 s
    done
    echo "nothing healthy on port $1" >&2
    return 1
}

# The suite, against the server on port $1; prints pytest's summary line.
run_suite() {
    TOOZ_TEST_HTTP_URL="http://localhost:$1" TOOZ_TEST_ETCD_PORT="$1" \
        "$venv/bin/python" -m pytest -q -p no:cacheprovider -rs "$suite"
}

if [ "$with_etcd" = 1 ]; then
    etcd --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$((base + 5))" \
        --advertise-client-urls "http://127.0.0.1:$((base + 5))" \
        --listen-peer-urls "http://127.0.0.1:$((base + 6))" \
        --initial-advertise-peer-urls "http://127.0.0.1:$((base + 6))" \
        --initial-cluster "default=http://127.0.0.1:$((base + 6))" >"$work/etcd.log" 2>&1 &
    pids+=($!)
    wait_health $((base + 5))
    echo "--- etcd3gw's suite against etcd $(etcd --version | sed -n 1p | awk '{print $3}')"
    run_suite $((base + 5))
fi

"$bin/keeld" --id 1 --data-dir "$work/keeld" --client-addr "127.0.0.1:$((base + 1))" \
    --peer-addr "127.0.0.1:$((base + 2))" --initial-cluster "1=127.0.0.1:$((base + 2))" >"$work/keeld.log" 2>&1 &
pids+=($!)
wait_health $((base + 1))
echo "--- etcd3gw's suite against keeld"
run_suite $((base + 1))
