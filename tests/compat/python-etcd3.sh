# shellcheck shell=bash
# Suite: the python `etcd3` client 0.12.0's own tests (`tests/test_etcd3.py` of its sdist, pytest),
# sourced by tests/compat/run.sh. The sdist comes from PyPI with pip; the client is installed
# from that same sdist into a venv under the target dir, with the test tools its tests import.
# The tests read PYTHON_ETCD_HTTP_URL for the endpoint and shell out to etcdctl (ETCDCTL_API=3)
# to set up and check keys; the auth tests call etcdctl with no endpoint (127.0.0.1:2379, the
# namespace's server). TEST_ETCD_VERSION names the etcd the suite's skips are judged against.
# Written for the pifpaf 3-node cluster of the upstream CI, a few tests (member names
# `pifpaf…`, quorum loss by SIGSTOPping pifpaf's processes) fail on any single node, etcd too.

python_etcd3_version=0.12.0
# The test tools, pinned so a run is repeatable: hypothesis and tenacity at the suite's own pins
# (requirements/test.txt; newer ones refuse its function-scoped fixtures, and etcd3 0.12 calls
# tenacity's old wait API), pytest and mock new enough for python 3.11.
python_etcd3_test_deps=(pytest==8.3.4 pytest-timeout==2.3.1 hypothesis==4.56.3 mock==5.1.0 six==1.17.0 tenacity==6.1.0)

server_flags() { :; }
setup() { :; }

prepare() {
    local out="$1"
    local venv="$out/venv" dl="$out/download"
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv"
    fi
    rm -rf "$dl" "$out/src"
    mkdir -p "$dl"
    "$venv/bin/pip" download -q --no-deps --no-binary :all: -d "$dl" "etcd3==$python_etcd3_version"
    tar -xzf "$dl/etcd3-$python_etcd3_version.tar.gz" -C "$dl"
    mv "$dl/etcd3-$python_etcd3_version" "$out/src"
    "$venv/bin/pip" install -q "$out/src" "${python_etcd3_test_deps[@]}"
}

run_suite() {
    local server="$1" out="$2"
    local etcd_version
    etcd_version="v$(etcd --version | sed -n 's/^etcd Version: //p')"
    # pytest's exit status is the suite's verdict, compared by run.sh: not this step's.
    (cd "$out/src" && PYTHON_ETCD_HTTP_URL=http://127.0.0.1:2379 TEST_ETCD_VERSION="$etcd_version" \
        PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python \
        timeout 1200 "$out/venv/bin/python" -m pytest tests/test_etcd3.py -p no:cacheprovider \
        --timeout 60 -q --junitxml "$out/$server.xml") >"$out/$server.log" 2>&1 || true
    junit_results "$out/$server.xml" "::" >"$out/$server.results"
}
