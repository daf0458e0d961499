# shellcheck shell=bash
# Suite: the npm `etcd3` client 1.1.2's mocha tests, sourced by tests/compat/run.sh. The
# published tarball (`npm pack etcd3@1.1.2`) ships only `lib/`, `proto/`, the readme and the
# license — no tests, no mocha setup — so there is nothing to run from the registry, and the
# upstream repository is not a source this job may use: `prepare` checks the tarball and skips
# with that reason.

npm_etcd3_version=1.1.2

server_flags() { :; }
setup() { :; }

prepare() {
    local out="$1"
    command -v npm >/dev/null || skip "npm is not installed"
    local dl="$out/download"
    rm -rf "$dl"
    mkdir -p "$dl"
    (cd "$dl" && npm pack -q "etcd3@$npm_etcd3_version" >/dev/null)
    local tests
    tests=$(tar -tzf "$dl/etcd3-$npm_etcd3_version.tgz" | grep -E '(^package/(src/)?tests?/|\.test\.[jt]s$|\.spec\.[jt]s$)' || true)
    if [ -z "$tests" ]; then
        skip "the npm tarball of etcd3 $npm_etcd3_version ships no tests" \
            "($(tar -tzf "$dl/etcd3-$npm_etcd3_version.tgz" | cut -d/ -f2 | sort -u | tr '\n' ' '))"
    fi
    echo "the npm tarball of etcd3 $npm_etcd3_version ships tests, which this job does not run yet:" >&2
    echo "$tests" >&2
    return 1
}

run_suite() { :; }
