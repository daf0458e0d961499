# shellcheck shell=bash
# Suite: the Rust `etcd-client` crate 0.21.1's own tests (`tests/` of the published crate: `client`,
# `namespace`, `testing`), sourced by tests/compat/run.sh. cargo fetches the crate (a throwaway
# project depending on it), its `.crate` from cargo's cache is unpacked and its tests are built
# there with the crate's own Cargo.lock, in a target dir under ours. The tests connect to
# localhost:2379 (hard-coded) and expect what the crate's CI sets up: a token TTL of 2 s and user
# root (password rootpwd) holding role root. Its build needs protoc.

rust_etcd_client_version=0.21.1

server_flags() { echo "--auth-token-ttl 2"; }

setup() {
    local ctl=(etcdctl --endpoints http://127.0.0.1:2379 --command-timeout 10s)
    "${ctl[@]}" user add root:rootpwd >/dev/null
    "${ctl[@]}" user grant-role root root >/dev/null
}

prepare() {
    local out="$1"
    command -v protoc >/dev/null || { echo "etcd-client's build needs protoc" >&2; return 1; }
    local fetch="$out/fetch"
    rm -rf "$fetch" "$out/src"
    mkdir -p "$fetch/src"
    cat >"$fetch/Cargo.toml" <<TOML
[package]
name = "fetch-etcd-client"
version = "0.0.0"
edition = "2021"

[dependencies]
etcd-client = "=$rust_etcd_client_version"

# target/ lies inside Keel's workspace: this package is not part of it.
[workspace]
TOML
    : >"$fetch/src/lib.rs"
    cargo fetch -q --manifest-path "$fetch/Cargo.toml"
    local crate
    crate=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"etcd-client-$rust_etcd_client_version.crate" | sed -n 1p)
    [ -f "$crate" ] || { echo "cargo fetch left no etcd-client-$rust_etcd_client_version.crate" >&2; return 1; }
    tar -xzf "$crate" -C "$out"
    mv "$out/etcd-client-$rust_etcd_client_version" "$out/src"
    # Nor is the suite's crate (its tests are left as they are).
    printf '\n[workspace]\n' >>"$out/src/Cargo.toml"
    # Built here, with the network, without debug info (as scripts/test builds); run.sh runs the
    # test binaries themselves inside the namespace, so nothing is rebuilt there.
    (cd "$out/src" && CARGO_TARGET_DIR="$out/target" CARGO_PROFILE_DEV_DEBUG=0 CARGO_INCREMENTAL=0 \
        cargo test -q --locked --tests --no-run --message-format json) |
        python3 -c '
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    # the integration tests of tests/ only, not the unit tests of the library
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["target"]["kind"] == ["test"]:
        print(msg["target"]["name"], msg["executable"])
' >"$out/tests.list"
    [ -s "$out/tests.list" ] || { echo "no test binaries built" >&2; return 1; }
}

run_suite() {
    local server="$1" out="$2" t bin
    : >"$out/$server.results"
    while read -r t bin; do
        # The test binary's exit status is the suite's verdict, compared by run.sh: not this step's.
        (cd "$out/src" && timeout 900 "$bin") >"$out/$server.$t.log" 2>&1 || true
        # A test that hung until the timeout has no line: it counts as not passed.
        sed -n "s/^test \([^ ]*\) \.\.\. \(ok\|FAILED\|ignored\).*/\2 $t::\1/p" "$out/$server.$t.log" |
            sed 's/^ok /PASS /; s/^FAILED /FAIL /; s/^ignored /SKIP /' >>"$out/$server.results"
        grep -q '^test result' "$out/$server.$t.log" || echo "$t on $server: no result line (timed out?)"
    done <"$out/tests.list"
}
