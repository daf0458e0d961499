# shellcheck shell=bash
# Suite: the npm `etcd3` client 1.1.2's own mocha tests (`src/test/*.test.ts`), sourced by
# tests/compat/run.sh. The published tarball ships only `lib/` and `proto/`, no tests, so the
# suite comes from a checkout of the upstream repository at v1.1.2, given in ETCD3_SRC:
#
#   git clone https://github.com/microsoft/etcd3 && git -C etcd3 checkout v1.1.2
#   ETCD3_SRC=$PWD/etcd3 tests/compat/run.sh npm-etcd3
#
# Without ETCD3_SRC the suite is skipped (GitHub is not a source CI can reach, so this suite is not
# in scripts/test). The checkout is copied under the target dir and left untouched; its dev
# dependencies come from the npm registry (`npm ci`, at its package-lock.json's pins), which also
# compiles the client and the tests (`prepare`: tsc, into lib/). As upstream's CI does, the server
# serves TLS on 127.0.0.1:2379 with the checkout's own certificates (src/test/certs, CA-signed for
# IP 127.0.0.1, valid to 2027): every test connects with that CA (src/test/util.ts `getOptions`),
# and the lease tests put a TLS proxy of their own in front. ETCD_VERSION, which a few tests
# compare against, is the installed etcd's (upstream's CI passes a `v`-prefixed one, which its
# comparison reads as NaN: the `3.2+` watch branch is then never taken; here it is).

npm_etcd3_version=1.1.2
# run.sh: the client port serves TLS; etcdctl's health check trusts the suite's CA.
client_scheme=https

certs() { echo "$CARGO_TARGET_DIR/compat/npm-etcd3/src/src/test/certs"; }

server_flags() {
    local c
    c="$(certs)"
    echo "--cert-file $c/certs/etcd0.localhost.crt --key-file $c/private/etcd0.localhost.key"
}
etcdctl_flags() { echo "--cacert $(certs)/certs/ca.crt"; }
setup() { :; }

prepare() {
    local out="$1"
    [ -n "${ETCD3_SRC:-}" ] || skip "the npm tarball of etcd3 ships no tests; set ETCD3_SRC to a" \
        "checkout of https://github.com/microsoft/etcd3 at v$npm_etcd3_version" \
        "(git clone https://github.com/microsoft/etcd3 &&" \
        "git -C etcd3 checkout v$npm_etcd3_version)"
    command -v node >/dev/null && command -v npm >/dev/null ||
        skip "node and npm are not installed (apt-get install nodejs npm)"
    [ -f "$ETCD3_SRC/package.json" ] || {
        echo "ETCD3_SRC=$ETCD3_SRC is not a checkout of etcd3 (no package.json)" >&2
        return 1
    }
    local version
    version=$(node -p "require(process.argv[1]).version" "$ETCD3_SRC/package.json")
    if [ "$version" != "$npm_etcd3_version" ] || [ ! -d "$ETCD3_SRC/src/test" ]; then
        echo "ETCD3_SRC=$ETCD3_SRC is etcd3 $version, not $npm_etcd3_version with its src/test" >&2
        return 1
    fi
    rm -rf "$out/src"
    mkdir -p "$out/src"
    # The tree without any node_modules/ or lib/ of the checkout's own: built here, from the lock.
    tar -C "$ETCD3_SRC" --exclude=./node_modules --exclude=./lib --exclude=./.git -cf - . |
        tar -C "$out/src" -xf -
    (cd "$out/src" && npm ci --no-audit --no-fund --loglevel=error) >"$out/npm-ci.log" 2>&1 || {
        tail -n 30 "$out/npm-ci.log" >&2
        return 1
    }
    [ -f "$out/src/lib/test/util.js" ] || {
        echo "npm ci did not compile the tests into lib/test ($out/npm-ci.log)" >&2
        return 1
    }
}

run_suite() {
    local server="$1" out="$2"
    local etcd_version
    etcd_version="$(etcd --version | sed -n 's/^etcd Version: //p')"
    # mocha's exit status is the suite's verdict, compared by run.sh: not this step's. The xunit
    # report has one <testcase> a test (a failed hook is one too, named after the hook).
    rm -f "$out/$server.xml"
    (cd "$out/src" && ETCD_ADDR=127.0.0.1:2379 ETCD_VERSION="$etcd_version" \
        timeout 1200 node_modules/.bin/mocha --reporter xunit \
            --reporter-option "output=$out/$server.xml") >"$out/$server.log" 2>&1 || true
    junit_results "$out/$server.xml" " :: " >"$out/$server.results"
}
