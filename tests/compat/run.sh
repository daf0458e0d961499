#!/usr/bin/env bash
# An etcd client library's own test suite, unmodified, against etcd 3.4 and against keeld: the
# compatibility job. Fails if any test that passes on etcd fails on keeld, and lists them.
#
#   tests/compat/run.sh SUITE            SUITE: python-etcd3 | rust-etcd-client | npm-etcd3
#
# The suite is downloaded at test time with its registry's own client (pip, cargo, npm), never
# committed (npm-etcd3's tests are not in its npm tarball: they come from a checkout of its
# repository given in ETCD3_SRC, and the suite is skipped without one); tests/compat/SUITE.sh says
# what it fetches and how it runs. Each server runs alone in a network namespace of its own
# (`unshare -n`, loopback only), on the default client port 127.0.0.1:2379, as the suites expect
# it (etcd-client's tests hard-code localhost:2379): no port is shared with anything else on the
# machine, and nothing of the namespace outlives the run.
# Both servers are started fresh (empty data dir), single-node, with the setup the suite's own
# CI gives etcd (tests/compat/SUITE.sh `server_flags` and `setup`).
#
# Known differences: tests/compat/SUITE.known lists tests that pass on etcd and are known not to
# pass on keeld, one `name  # why` a line (a difference docs/etcd-api.md records, or work another
# change owns). They are reported, not failed; one that passes on keeld again is reported too, to
# be taken off the list.
#
# Results: $CARGO_TARGET_DIR/compat/SUITE/{etcd,keeld}.results, one `PASS|FAIL|SKIP name` a line,
# and each run's full log beside them. Needs root (or unprivileged user namespaces), etcd and
# etcdctl 3.4, cargo; keeld is built here from this tree (`cargo build --bin keeld`).
set -euo pipefail
cd "$(dirname "$0")/../.."
root="$PWD"
target="${CARGO_TARGET_DIR:-$root/target}"
case "$target" in /*) ;; *) target="$root/$target" ;; esac
export CARGO_TARGET_DIR="$target"

usage() { echo "usage: $0 python-etcd3|rust-etcd-client|npm-etcd3" >&2; exit 2; }

# For the suites' scripts: a JUnit XML report (FILE) as results lines, `PASS|FAIL|SKIP name`, a
# test named by its class and name joined with SEP.
junit_results() { # file sep
    python3 - "$1" "$2" <<'PY'
import sys
import xml.etree.ElementTree as ET

for case in ET.parse(sys.argv[1]).iter("testcase"):
    name = f"{case.get('classname')}{sys.argv[2]}{case.get('name')}"
    tags = {child.tag for child in case}
    if tags & {"failure", "error"}:
        print("FAIL", name)
    elif "skipped" in tags:
        print("SKIP", name)
    else:
        print("PASS", name)
PY
}

# --- Inside the namespace: one server, the suite, the server stopped. ---------------------------
if [ "${1:-}" = "--inside" ]; then
    server="$2" suite="$3" out="$4"
    # shellcheck source=/dev/null
    source "$root/tests/compat/$suite.sh"
    ip link set lo up
    # A suite may have the client port serve TLS (client_scheme=https, the certificates in its
    # server_flags) and give etcdctl what it needs to reach it (etcdctl_flags).
    scheme="${client_scheme:-http}"
    declare -F etcdctl_flags >/dev/null || etcdctl_flags() { :; }
    data="$(mktemp -d)"
    pid=""
    stop_server() {
        if [ -n "$pid" ]; then
            kill -9 "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
        rm -rf "$data"
    }
    trap stop_server EXIT
    trap 'exit 1' INT TERM # so that the server is stopped when the job is
    case "$server" in
    etcd)
        # shellcheck disable=SC2046
        etcd --name default --data-dir "$data/etcd" \
            --listen-client-urls "$scheme://127.0.0.1:2379" \
            --advertise-client-urls "$scheme://127.0.0.1:2379" \
            --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
            --initial-cluster default=http://127.0.0.1:2380 $(server_flags etcd) \
            >"$out/etcd.server.log" 2>&1 &
        ;;
    keeld)
        # shellcheck disable=SC2046
        "$target/debug/keeld" --id 1 --data-dir "$data/keel" \
            --client-addr 127.0.0.1:2379 --peer-addr 127.0.0.1:2380 \
            --initial-cluster 1=127.0.0.1:2380 $(server_flags keeld) \
            >"$out/keeld.server.log" 2>&1 &
        ;;
    *) echo "unknown server $server" >&2; exit 2 ;;
    esac
    pid=$!
    export ETCDCTL_API=3
    healthy=0
    for _ in $(seq 1 150); do
        # shellcheck disable=SC2046
        if etcdctl --endpoints "$scheme://127.0.0.1:2379" $(etcdctl_flags) --dial-timeout 1s \
            --command-timeout 2s endpoint health >/dev/null 2>&1; then
            healthy=1
            break
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2 # polling a condition (the server answers), bounded: 30 s
    done
    if [ "$healthy" != 1 ]; then
        echo "$server did not become healthy on 127.0.0.1:2379; its log:" >&2
        tail -n 40 "$out/$server.server.log" >&2
        exit 1
    fi
    setup "$server"
    run_suite "$server" "$out"
    exit 0
fi

# --- Outside: fetch and build the suite, run it on both servers, compare. ----------------------
[ $# -eq 1 ] || usage
suite="$1"
[ -f "$root/tests/compat/$suite.sh" ] || usage
# shellcheck source=/dev/null
source "$root/tests/compat/$suite.sh"
out="$target/compat/$suite"
mkdir -p "$out"

step() { echo "--- compat $suite: $* ($(date -u +%H:%M:%S))"; }

if [ "$(id -u)" = 0 ]; then ns=(unshare --net); else ns=(unshare --user --map-root-user --net); fi
"${ns[@]}" true 2>/dev/null || {
    echo "compat $suite: cannot make a network namespace (${ns[*]}): run as root" >&2
    exit 1
}

step "fetching and preparing the suite"
# A suite that cannot run here says why and exits 0 from `prepare` (`skip`).
skip() { echo "compat $suite: SKIPPED: $*"; exit 0; }
prepare "$out"

step "building keeld"
cargo build -q --bin keeld

for server in etcd keeld; do
    step "running on $server"
    started=$(date +%s)
    rm -f "$out/$server.results"
    # The suite's own failures are expected (that is what is compared); only a harness failure
    # (no server, no results) stops the job.
    if ! "${ns[@]}" bash "$0" --inside "$server" "$suite" "$out"; then
        echo "compat $suite: the run on $server failed before it produced results" >&2
        exit 1
    fi
    [ -s "$out/$server.results" ] || { echo "compat $suite: no results from $server" >&2; exit 1; }
    # Not worded as a test runner's closing line: the verdict is the comparison's, below.
    echo "on $server: passed $(grep -c '^PASS' "$out/$server.results" || true)," \
        "failed $(grep -c '^FAIL' "$out/$server.results" || true)," \
        "skipped $(grep -c '^SKIP' "$out/$server.results" || true) ($(($(date +%s) - started)) s;" \
        "log: $out/$server*.log)"
done

step "comparing"
known="$root/tests/compat/$suite.known"
[ -f "$known" ] || known=/dev/null
python3 - "$out/etcd.results" "$out/keeld.results" "$known" <<'EOF'
import sys

def load(path):
    res = {}
    with open(path) as f:
        for line in f:
            state, _, name = line.rstrip("\n").partition(" ")
            res[name] = state
    return res

etcd, keel = load(sys.argv[1]), load(sys.argv[2])
known = {}
with open(sys.argv[3]) as f:
    for line in f:
        name, _, why = line.partition("#")
        if name.strip():
            known[name.strip()] = why.strip()
regressed = sorted(n for n, s in etcd.items() if s == "PASS" and keel.get(n) != "PASS")
for n in sorted(n for n in known if n in regressed):
    print(f"  known difference, passes on etcd, not on keeld: {n} ({known[n]})")
for n in sorted(n for n in known if n not in regressed):
    print(f"  listed as a known difference but no longer one: {n} (take it off the list)")
unknown = [n for n in regressed if n not in known]
better = sorted(n for n, s in keel.items() if s == "PASS" and etcd.get(n) != "PASS")
both_fail = sorted(n for n, s in etcd.items() if s == "FAIL" and keel.get(n) == "FAIL")
for n in both_fail:
    print(f"  fails on both: {n}")
for n in better:
    print(f"  passes on keeld only: {n}")
for n in unknown:
    print(f"  PASSES ON ETCD, NOT ON KEELD ({keel.get(n, 'missing')}): {n}")
print(f"compat: {len(regressed)} of {sum(s == 'PASS' for s in etcd.values())} tests that pass on "
      f"etcd do not pass on keeld, {len(unknown)} of them not known differences")
sys.exit(1 if unknown else 0)
EOF
