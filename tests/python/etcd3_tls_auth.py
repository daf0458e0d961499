"""The python `etcd3` client (kragniz/python-etcd3, unmodified, from PyPI) against a keeld
cluster with TLS on the client port and auth on: a CA certificate and a user name and password,
nothing else. Run by tests/python/run.sh, which sets up the cluster and the users.

Usage: etcd3_tls_auth.py HOST PORT CA_FILE
"""

import sys

import etcd3
import etcd3.exceptions

host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]


def client(user=None, password=None):
    return etcd3.client(host=host, port=port, ca_cert=ca, user=user, password=password, timeout=10)


def expect_failure(what, fn, needle):
    try:
        fn()
    except Exception as e:  # etcd3 raises grpc errors and its own alike
        if needle.lower() not in str(e).lower():
            sys.exit(f"FAIL {what}: expected an error with {needle!r}, got {e!r}")
        print(f"ok   {what}: refused ({needle})")
        return
    sys.exit(f"FAIL {what}: it was allowed")


alice = client("alice", "alice-pw")
alice.put("app/greeting", "hello")
value, meta = alice.get("app/greeting")
assert value == b"hello", value
print("ok   alice writes and reads app/ over TLS with a CA certificate and her password")

items = sorted(v for v, _ in alice.get_prefix("app/"))
assert items == [b"hello"], items
lease = alice.lease(30)
alice.put("app/session", "on", lease=lease)
assert alice.get("app/session")[0] == b"on"
lease.revoke()
assert alice.get("app/session")[0] is None
print("ok   a lease, a key attached to it, the key gone with the revoke")

ok, _ = alice.transaction(
    compare=[alice.transactions.value("app/greeting") == "hello"],
    success=[alice.transactions.put("app/greeting", "hi")],
    failure=[],
)
assert ok and alice.get("app/greeting")[0] == b"hi"
print("ok   a transaction within her permission")

expect_failure("alice writes outside app/", lambda: alice.put("other/x", "1"), "permission denied")
expect_failure("alice reads outside app/", lambda: alice.get("other/x"), "permission denied")
expect_failure(
    "a txn with one forbidden op",
    lambda: alice.transaction(
        compare=[],
        success=[alice.transactions.put("app/a", "1"), alice.transactions.put("other/b", "1")],
        failure=[],
    ),
    "permission denied",
)
assert alice.get("app/a")[0] is None, "nothing of the refused txn was applied"
expect_failure("a wrong password", lambda: client("alice", "wrong").get("app/greeting"), "authentication failed")
expect_failure("no user", lambda: client().get("app/greeting"), "user name is empty")

root = client("root", "root-pw")
root.put("other/x", "1")
assert root.get("other/x")[0] == b"1"
print("ok   root may do anything")
print("PASS python etcd3 with TLS and auth")
