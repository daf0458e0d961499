//! etcd's grpc-gateway JSON API (`/v3/...`) on keeld's client port, held to etcd 3.4 itself: the
//! same script of requests runs against a real etcd and a real keeld, and the answers (HTTP
//! status and JSON body) must be equal but for the cluster, member and term in headers and the
//! tokens. Then what etcd 3.4 does not serve (or serves differently) is checked on keeld alone.

mod procs;

use std::convert::Infallible;
use std::time::Duration;

use base64::Engine;
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use http_body_util::Full;
use http_body_util::StreamBody;
use hyper::body::Bytes;
use hyper::body::Frame;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use procs::Etcd;
use procs::Procs;
use serde_json::json;
use serde_json::Value;
use tokio::sync::mpsc;

/// keeld's `client_header_timeout_ms` in `gateway_beyond_etcd_3_4`.
const BODY_DEADLINE: Duration = Duration::from_millis(1500);

/// How long one answer, or one line of a stream, may take.
const ANSWER: Duration = Duration::from_secs(15);

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

type Body = BoxBody<Bytes, Infallible>;

/// One HTTP/1.1 request on its own connection.
async fn send(addr: &str, path: &str, token: Option<&str>, body: Body) -> hyper::Response<Incoming> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    let mut req = hyper::Request::post(path).header("host", addr).header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", t);
    }
    let req = req.body(body).expect("request");
    tokio::time::timeout(ANSWER, sender.send_request(req))
        .await
        .unwrap_or_else(|_| panic!("{addr}{path}: no answer within {ANSWER:?}"))
        .unwrap_or_else(|e| panic!("{addr}{path}: {e}"))
}

/// A unary call: (HTTP status, JSON body).
async fn call(addr: &str, path: &str, token: Option<&str>, body: &Value) -> (u16, Value) {
    let body = Full::new(Bytes::from(body.to_string())).boxed();
    raw(addr, path, token, body).await
}

async fn raw(addr: &str, path: &str, token: Option<&str>, body: Body) -> (u16, Value) {
    let resp = send(addr, path, token, body).await;
    let status = resp.status().as_u16();
    let bytes = tokio::time::timeout(ANSWER, resp.into_body().collect())
        .await
        .unwrap_or_else(|_| panic!("{addr}{path}: body not complete within {ANSWER:?}"))
        .expect("body")
        .to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!("{addr}{path}: answer is not JSON ({e}): {}", String::from_utf8_lossy(&bytes))
    });
    (status, json)
}

/// Announces a body of `len` bytes, sends 1 KiB of it, and reads the answer (which keeld sends
/// without reading the rest, then closes the connection).
async fn announce_large_body(addr: &str, path: &str, len: usize) -> (u16, Value) {
    use tokio::io::AsyncReadExt;
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let head = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {len}\r\n\r\n");
    s.write_all(head.as_bytes()).await.expect("send the header");
    s.write_all(&[b' '; 1024]).await.expect("send a little of the body");
    let mut answer = Vec::new();
    tokio::time::timeout(ANSWER, s.read_to_end(&mut answer))
        .await
        .unwrap_or_else(|_| panic!("{addr}{path}: no answer within {ANSWER:?}"))
        .expect("read the answer");
    let answer = String::from_utf8_lossy(&answer);
    let status = answer.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or_else(|e| panic!("{addr}{path}: {e}: {answer}")))
}

/// A streamed call: request messages sent as they are written, answer lines read as they come.
struct Stream {
    what: String,
    tx: Option<mpsc::Sender<Bytes>>,
    status: u16,
    body: Incoming,
    buf: Vec<u8>,
}

impl Stream {
    async fn open(addr: &str, path: &str, token: Option<&str>, first: &Value) -> Stream {
        let (tx, rx) = mpsc::channel::<Bytes>(4);
        tx.send(Bytes::from(first.to_string())).await.expect("queue the first message");
        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
        });
        let resp = send(addr, path, token, StreamBody::new(frames).boxed()).await;
        let status = resp.status().as_u16();
        Stream {
            what: format!("{addr}{path}"),
            tx: Some(tx),
            status,
            body: resp.into_body(),
            buf: Vec::new(),
        }
    }

    /// A stream whose whole request body is `messages`, sent at once. etcd's gateway needs this:
    /// Go's HTTP/1.1 server reads the rest of a request body before it sends the answer's header,
    /// so it answers nothing while the body stays open (etcd3gw sends whole bodies too).
    async fn whole(addr: &str, path: &str, token: Option<&str>, messages: &[Value]) -> Stream {
        let body: String = messages.iter().map(Value::to_string).collect();
        let resp = send(addr, path, token, Full::new(Bytes::from(body)).boxed()).await;
        let status = resp.status().as_u16();
        Stream { what: format!("{addr}{path}"), tx: None, status, body: resp.into_body(), buf: Vec::new() }
    }

    async fn send(&self, message: &Value) {
        let tx = self.tx.as_ref().expect("request side open");
        tx.send(Bytes::from(message.to_string())).await.expect("the request body is still read");
    }

    /// Ends the request side (the answer goes on).
    fn close_send(&mut self) {
        self.tx = None;
    }

    /// The next line of the answer, as JSON; `None` at its end.
    async fn line(&mut self) -> Option<Value> {
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let v = serde_json::from_slice(&line).unwrap_or_else(|e| {
                    panic!("{}: line is not JSON ({e}): {}", self.what, String::from_utf8_lossy(&line))
                });
                return Some(v);
            }
            let frame = tokio::time::timeout(ANSWER, self.body.frame())
                .await
                .unwrap_or_else(|_| panic!("{}: no line within {ANSWER:?}", self.what));
            match frame {
                // A unary error body has no newline after it.
                None if self.buf.is_empty() => return None,
                None => self.buf.push(b'\n'),
                Some(f) => {
                    if let Ok(data) = f.expect("stream frame").into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    /// Lines until they held `n` events in all (a server may batch events in one answer).
    async fn events(&mut self, n: usize) -> Vec<Value> {
        let (mut lines, mut seen) = (Vec::new(), 0);
        while seen < n {
            let line = self.expect_line().await;
            seen += line["result"]["events"].as_array().map_or(0, Vec::len);
            lines.push(line);
        }
        lines
    }

    async fn expect_line(&mut self) -> Value {
        let what = self.what.clone();
        self.line().await.unwrap_or_else(|| panic!("{what}: the answer ended early"))
    }
}

/// Drops what differs between two clusters by nature: their ids, terms and tokens. And one
/// known difference of Keel's txns (docs/etcd-api.md): the header of each response inside a txn
/// has the txn's final revision in Keel, the revision at that op in etcd.
fn normalize(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for k in ["cluster_id", "member_id", "raft_term"] {
                m.remove(k);
            }
            if let Some(t) = m.get_mut("token") {
                *t = json!("TOKEN");
            }
            if let Some(Value::Array(responses)) = m.get_mut("responses") {
                for r in responses.iter_mut().filter_map(Value::as_object_mut) {
                    for inner in r.values_mut().filter_map(Value::as_object_mut) {
                        inner.remove("header");
                    }
                }
            }
            m.values_mut().for_each(normalize);
        }
        Value::Array(a) => a.iter_mut().for_each(normalize),
        _ => {}
    }
}

/// The answers of one target to the script, in order, each named.
#[derive(Default)]
struct Record(Vec<(String, Value)>);

impl Record {
    fn push(&mut self, name: &str, status: u16, mut body: Value) {
        normalize(&mut body);
        self.0.push((name.to_string(), json!({"status": status, "body": body})));
    }

    /// An error whose text is the implementation's own (a JSON parser's): status and code only.
    fn push_code(&mut self, name: &str, status: u16, body: &Value) {
        self.0.push((name.to_string(), json!({"status": status, "code": body["code"]})));
    }
}

/// The script run against both: every answer recorded.
async fn script(addr: &str) -> Record {
    let mut r = Record::default();
    let a = addr;
    macro_rules! step {
        ($name:expr, $path:expr, $body:expr) => {{
            let (s, v) = call(a, $path, None, &$body).await;
            r.push($name, s, v.clone());
            v
        }};
        ($name:expr, $path:expr, $token:expr, $body:expr) => {{
            let (s, v) = call(a, $path, Some($token), &$body).await;
            r.push($name, s, v.clone());
            v
        }};
    }

    // Key-value.
    step!("put foo", "/v3/kv/put", json!({"key": b64("foo"), "value": b64("bar")}));
    step!("put foo prev_kv", "/v3/kv/put", json!({"key": b64("foo"), "value": b64("baz"), "prev_kv": true}));
    step!("put app/1", "/v3/kv/put", json!({"key": b64("app/1"), "value": b64("one")}));
    step!("put app/2 (beta)", "/v3beta/kv/put", json!({"key": b64("app/2"), "value": b64("two")}));
    step!("put app/3", "/v3/kv/put", json!({"key": b64("app/3"), "value": b64("")}));
    step!("range foo", "/v3/kv/range", json!({"key": b64("foo")}));
    step!("range missing", "/v3/kv/range", json!({"key": b64("nope")}));
    step!(
        "range prefix sorted, limited",
        "/v3/kv/range",
        json!({"key": b64("app/"), "range_end": b64("app0"), "sort_order": "DESCEND", "sort_target": "KEY", "limit": 2})
    );
    step!(
        "range camelCase names, numbers as strings",
        "/v3/kv/range",
        json!({"key": b64("app/"), "rangeEnd": b64("app0"), "keysOnly": true, "limit": "5"})
    );
    step!(
        "range count only",
        "/v3/kv/range",
        json!({"key": b64("a"), "range_end": b64("b"), "count_only": true})
    );
    step!("range at revision 2", "/v3/kv/range", json!({"key": b64("foo"), "revision": 2}));
    step!("range future revision", "/v3/kv/range", json!({"key": b64("foo"), "revision": 1000}));
    step!("range no key", "/v3/kv/range", json!({}));
    step!(
        "put ignore_value of a missing key",
        "/v3/kv/put",
        json!({"key": b64("nope"), "ignore_value": true})
    );
    let (s, v) = call(a, "/v3/kv/range", None, &json!("not an object")).await;
    r.push_code("range of a string", s, &v);
    let (s, v) = raw(a, "/v3/kv/range", None, Full::new(Bytes::from_static(b"{garbage")).boxed()).await;
    r.push_code("range of garbage", s, &v);
    step!("range with unknown field", "/v3/kv/range", json!({"key": b64("foo"), "no_such_field": 1}));

    // Txn: compares of every target, nested txn, both branches.
    let txn = json!({
        "compare": [
            {"key": b64("foo"), "target": "VALUE", "result": "EQUAL", "value": b64("baz")},
            {"key": b64("foo"), "target": "VERSION", "result": "GREATER", "version": 1},
            {"key": b64("app/1"), "target": "MOD", "result": "LESS", "mod_revision": 100},
            {"key": b64("app/1"), "target": "CREATE", "result": "NOT_EQUAL", "create_revision": 0},
            {"key": b64("app/1"), "target": "LEASE", "result": "EQUAL", "lease": 0}
        ],
        "success": [
            {"request_put": {"key": b64("t/1"), "value": b64("x"), "prev_kv": true}},
            {"request_range": {"key": b64("app/"), "range_end": b64("app0")}},
            {"request_txn": {
                "compare": [{"key": b64("t/1"), "target": "VERSION", "result": "EQUAL", "version": 1}],
                "success": [{"request_delete_range": {"key": b64("app/3"), "prev_kv": true}}],
                "failure": []
            }}
        ],
        "failure": [{"request_put": {"key": b64("t/failed"), "value": b64("x")}}]
    });
    step!("txn succeeds", "/v3/kv/txn", txn);
    let failing = json!({
        "compare": [{"key": b64("foo"), "target": "VALUE", "result": "EQUAL", "value": b64("other")}],
        "success": [{"requestPut": {"key": b64("t/never"), "value": b64("x")}}],
        "failure": [{"requestRange": {"key": b64("foo")}}, {"requestPut": {"key": b64("t/2"), "value": b64("y")}}]
    });
    step!("txn fails its compare", "/v3/kv/txn", failing);
    step!(
        "txn duplicate keys",
        "/v3/kv/txn",
        json!({"success": [
            {"request_put": {"key": b64("d"), "value": b64("1")}},
            {"request_put": {"key": b64("d"), "value": b64("2")}}
        ]})
    );
    step!("txn empty", "/v3/kv/txn", json!({}));
    step!(
        "deleterange prefix prev_kv",
        "/v3/kv/deleterange",
        json!({"key": b64("t/"), "range_end": b64("t0"), "prev_kv": true})
    );
    step!("deleterange missing", "/v3/kv/deleterange", json!({"key": b64("t/")}));

    // Compaction, and what it leaves.
    step!("compaction", "/v3/kv/compaction", json!({"revision": 4, "physical": true}));
    step!("range compacted", "/v3/kv/range", json!({"key": b64("foo"), "revision": 2}));
    step!("compaction again", "/v3/kv/compaction", json!({"revision": 3}));
    step!("compaction future", "/v3/kv/compaction", json!({"revision": 1000}));

    // Leases, with an id chosen by the client so both answer the same.
    step!("lease grant", "/v3/lease/grant", json!({"TTL": 60, "ID": 7000}));
    step!("lease grant taken id", "/v3/lease/grant", json!({"TTL": 60, "ID": 7000}));
    step!("put on lease", "/v3/kv/put", json!({"key": b64("leased"), "value": b64("v"), "lease": 7000}));
    step!(
        "put on missing lease",
        "/v3/kv/put",
        json!({"key": b64("leased"), "value": b64("v"), "lease": 99})
    );
    let (s, mut v) = call(a, "/v3/lease/timetolive", None, &json!({"ID": 7000, "keys": true})).await;
    let ttl: i64 = v["TTL"].as_str().and_then(|t| t.parse().ok()).unwrap_or(-100);
    assert!((50..=60).contains(&ttl), "{a}: lease 7000 has {ttl} s left of 60: {v}");
    v["TTL"] = json!("LEFT");
    r.push("lease timetolive", s, v);
    step!("lease leases", "/v3/lease/leases", json!({}));
    step!("lease leases (kv)", "/v3/kv/lease/leases", json!({}));
    let mut ka =
        Stream::whole(a, "/v3/lease/keepalive", None, &[json!({"ID": 7000}), json!({"ID": "7000"})]).await;
    r.push("keepalive status", ka.status, json!(null));
    let first = ka.expect_line().await;
    r.push("keepalive 1", ka.status, first);
    let second = ka.expect_line().await;
    r.push("keepalive 2", ka.status, second);
    // The end of the request body ends a keep-alive stream once it has answered.
    let end = ka.line().await;
    r.push("keepalive ends with its input", ka.status, json!(end));
    drop(ka);
    step!("lease revoke", "/v3/lease/revoke", json!({"ID": 7000}));
    step!("lease key gone", "/v3/kv/range", json!({"key": b64("leased")}));
    step!("lease revoke again", "/v3/lease/revoke", json!({"ID": 7000}));
    step!("lease timetolive revoked", "/v3/kv/lease/timetolive", json!({"ID": 7000}));

    // Watch: history from a revision, then live events; a prefix with prev_kv and a filter; a
    // cancel; a start below the compaction.
    let create = |key: &str, extra: Value| {
        let mut c = json!({"key": b64(key)});
        if let (Some(c), Value::Object(e)) = (c.as_object_mut(), extra) {
            c.extend(e);
        }
        json!({"create_request": c})
    };
    let history = create("t/", json!({"range_end": b64("t0"), "start_revision": 4}));
    let mut w = Stream::whole(a, "/v3/watch", None, &[history]).await;
    let line = w.expect_line().await;
    r.push("watch history created", w.status, line);
    // The txns' puts of t/1 and t/2, the delete of both.
    for (i, line) in w.events(4).await.into_iter().enumerate() {
        r.push(&format!("watch history {i}"), 200, line);
    }
    step!("put t/live for the watch", "/v3/kv/put", json!({"key": b64("t/live"), "value": b64("live")}));
    let line = w.expect_line().await;
    r.push("watch live event", 200, line);
    drop(w);
    let prefix = create("w/", json!({"range_end": b64("w0"), "prev_kv": true, "filters": ["NODELETE"]}));
    let mut w = Stream::whole(a, "/v3/watch", None, &[prefix]).await;
    let line = w.expect_line().await;
    r.push("watch prefix created", 200, line);
    step!("put w/a", "/v3/kv/put", json!({"key": b64("w/a"), "value": b64("1")}));
    step!("put w/a again", "/v3/kv/put", json!({"key": b64("w/a"), "value": b64("2")}));
    step!("delete w/a", "/v3/kv/deleterange", json!({"key": b64("w/a")}));
    step!("put w/b", "/v3/kv/put", json!({"key": b64("w/b"), "value": b64("3")}));
    for (i, line) in w.events(3).await.into_iter().enumerate() {
        r.push(&format!("watch prefix event {i}"), 200, line);
    }
    drop(w);
    let cancel = json!({"cancel_request": {"watch_id": 0}});
    let mut w = Stream::whole(a, "/v3/watch", None, &[create("foo", json!({})), cancel]).await;
    for i in 0..2 {
        let line = w.expect_line().await;
        r.push(&format!("watch create and cancel {i}"), w.status, line);
    }
    drop(w);
    let mut w = Stream::whole(a, "/v3/watch", None, &[create("foo", json!({"start_revision": 2}))]).await;
    for i in 0..2 {
        let line = w.expect_line().await;
        r.push(&format!("watch compacted {i}"), w.status, line);
    }
    drop(w);

    // Auth: users, roles, a token in Authorization, refusals.
    step!("user add root", "/v3/auth/user/add", json!({"name": "root", "password": "root-pw"}));
    step!("role add root", "/v3/auth/role/add", json!({"name": "root"}));
    step!("user grant root", "/v3/auth/user/grant", json!({"user": "root", "role": "root"}));
    step!("user add alice", "/v3/auth/user/add", json!({"name": "alice", "password": "alice-pw"}));
    step!("user add alice again", "/v3/auth/user/add", json!({"name": "alice", "password": "x"}));
    step!("role add app", "/v3/auth/role/add", json!({"name": "app"}));
    step!(
        "role grant app",
        "/v3/auth/role/grant",
        json!({"name": "app", "perm": {"permType": "READWRITE", "key": b64("app/"), "range_end": b64("app0")}})
    );
    step!("user grant alice", "/v3/auth/user/grant", json!({"user": "alice", "role": "app"}));
    step!("user grant missing role", "/v3/auth/user/grant", json!({"user": "alice", "role": "nope"}));
    step!("auth enable", "/v3/auth/enable", json!({}));
    step!("range without a token", "/v3/kv/range", json!({"key": b64("app/1")}));
    step!("authenticate wrong password", "/v3/auth/authenticate", json!({"name": "alice", "password": "no"}));
    let v = step!(
        "authenticate alice",
        "/v3/auth/authenticate",
        json!({"name": "alice", "password": "alice-pw"})
    );
    let alice = v["token"].as_str().unwrap_or_else(|| panic!("{a}: no token: {v}")).to_string();
    let v =
        step!("authenticate root", "/v3/auth/authenticate", json!({"name": "root", "password": "root-pw"}));
    let root = v["token"].as_str().unwrap_or_else(|| panic!("{a}: no token: {v}")).to_string();
    step!(
        "alice reads her keys",
        "/v3/kv/range",
        &alice,
        json!({"key": b64("app/"), "range_end": b64("app0")})
    );
    step!("alice writes her keys", "/v3/kv/put", &alice, json!({"key": b64("app/9"), "value": b64("9")}));
    step!("alice writes outside", "/v3/kv/put", &alice, json!({"key": b64("foo"), "value": b64("x")}));
    step!("alice lists users", "/v3/auth/user/list", &alice, json!({}));
    step!("bogus token", "/v3/kv/range", "bogus", json!({"key": b64("app/1")}));
    step!("root gets alice", "/v3/auth/user/get", &root, json!({"name": "alice"}));
    step!("root gets app", "/v3/auth/role/get", &root, json!({"role": "app"}));
    step!("root lists roles", "/v3/auth/role/list", &root, json!({}));
    let mut w = Stream::whole(a, "/v3/watch", Some(&alice), &[create("app/1", json!({}))]).await;
    let line = w.expect_line().await;
    r.push("alice watches her key", w.status, line);
    drop(w);
    step!(
        "root revokes",
        "/v3/auth/role/revoke",
        &root,
        json!({"role": "app", "key": b64("app/"), "range_end": b64("app0")})
    );
    step!("alice reads after the revoke", "/v3/kv/range", &alice, json!({"key": b64("app/1")}));
    step!("changepw", "/v3/auth/user/changepw", &root, json!({"name": "alice", "password": "new-pw"}));
    step!("user revoke", "/v3/auth/user/revoke", &root, json!({"name": "alice", "role": "app"}));
    step!("role delete", "/v3/auth/role/delete", &root, json!({"role": "app"}));
    step!("user delete", "/v3/auth/user/delete", &root, json!({"name": "alice"}));
    step!("auth disable", "/v3/auth/disable", &root, json!({}));
    step!("range after disable", "/v3/kv/range", json!({"key": b64("app/1")}));

    // Maintenance and cluster, the parts that compare.
    // etcd 3.4 answers an alarm list without a header; Keel with one.
    let (s, v) = call(a, "/v3/maintenance/alarm", None, &json!({"action": "GET"})).await;
    r.push("alarm list", s, json!({"alarms": v["alarms"]}));
    step!("member remove missing", "/v3/cluster/member/remove", json!({"ID": 12345}));
    // A lock without a lease is held on a lease the server grants: its id is in the key.
    let (s, mut v) = call(a, "/v3/lock/lock", None, &json!({"name": b64("unleased")})).await;
    let key = v["key"].as_str().and_then(|k| base64::engine::general_purpose::STANDARD.decode(k).ok());
    let key = key.map(|k| String::from_utf8_lossy(&k).into_owned()).unwrap_or_default();
    let (name, lease) = key.split_once('/').unwrap_or_else(|| panic!("{a}: lock key {key:?}"));
    assert!(u64::from_str_radix(lease, 16).is_ok_and(|l| l != 0), "{a}: lock key {key:?}");
    v["key"] = json!(name);
    r.push("lock", s, v);
    r
}

#[test]
fn gateway_answers_as_etcd_does() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let etcd = Etcd::start(&[]);
    let keel = Procs::start(1, 0, "");
    let expected = rt.block_on(script(&etcd.client));
    let got = rt.block_on(script(&keel.client(1)));
    let mut diffs = Vec::new();
    for (i, ((name, e), (_, g))) in expected.0.iter().zip(&got.0).enumerate() {
        if e != g {
            diffs.push(format!("step {i} {name}:\n  etcd:  {e}\n  keeld: {g}"));
        }
    }
    assert_eq!(expected.0.len(), got.0.len(), "both ran the whole script");
    assert!(
        diffs.is_empty(),
        "{} of {} answers differ:\n{}",
        diffs.len(),
        expected.0.len(),
        diffs.join("\n")
    );
}

/// `/version` as Patroni and etcd3gw parse it, and `/health` as etcd writes it.
#[test]
fn version_and_health_have_etcds_shape() {
    let etcd = Etcd::start(&[]);
    let keel = Procs::start(1, 0, "");
    for addr in [etcd.client.clone(), keel.client(1)] {
        let v = procs::get_json(&addr, "/version").expect("/version");
        for field in ["etcdserver", "etcdcluster"] {
            let s = v[field].as_str().unwrap_or_else(|| panic!("{addr}: no {field} in {v}"));
            let parts: Vec<u64> = s
                .split('.')
                .map(|p| {
                    p.parse()
                        .unwrap_or_else(|e| panic!("{addr}: {field} {s:?}: {p:?} is not an integer: {e}"))
                })
                .collect();
            assert_eq!(3, parts.len(), "{addr}: {field} {s:?}");
            assert!((parts[0], parts[1]) >= (3, 4), "{addr}: {field} {s:?} is below 3.4");
        }
        let h = procs::get_json(&addr, "/health").expect("/health");
        assert_eq!(json!("true"), h["health"], "{addr}: {h}");
    }
    let v = procs::get_json(&keel.client(1), "/version").expect("/version");
    assert_eq!(json!(env!("CARGO_PKG_VERSION")), v["keel"], "{v}");
}

/// What etcd 3.4's gateway lacks or etcd answers otherwise, on keeld alone.
#[test]
fn gateway_beyond_etcd_3_4() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    // A short whole-body deadline: a stream's request body must outlive it.
    let keel = Procs::start(1, 0, &format!("client_header_timeout_ms = {}\n", BODY_DEADLINE.as_millis()));
    let a = keel.client(1);
    rt.block_on(async {
        // etcd 3.5's routes.
        let (s, v) = call(&a, "/v3/auth/status", None, &json!({})).await;
        assert_eq!((200, None), (s, v.get("enabled")), "auth status while off: {v}");
        let (s, v) = call(&a, "/v3/maintenance/hashkv", None, &json!({})).await;
        assert_eq!(200, s, "{v}");
        assert_eq!(json!("1"), v["hash_revision"], "hashkv: {v}");
        let (s, v) = call(&a, "/v3/kv/lease/revoke", None, &json!({"ID": 1})).await;
        assert_eq!((404, json!(5)), (s, v["code"].clone()), "{v}");
        let (s, v) = call(&a, "/v3/cluster/member/list", None, &json!({})).await;
        assert_eq!(200, s);
        assert_eq!(1, v["members"].as_array().map_or(0, Vec::len), "{v}");
        assert!(v["members"][0]["ID"].is_string() && v["members"][0]["clientURLs"].is_array(), "{v}");
        let (s, v) = call(&a, "/v3/maintenance/status", None, &json!({})).await;
        assert_eq!(200, s);
        assert!(
            v["version"].as_str().is_some_and(|s| s.starts_with("3.5.0")) && v["dbSize"].is_string(),
            "{v}"
        );
        // No v3alpha in etcd 3.4, nor here.
        let (s, _) = call(&a, "/v3alpha/kv/range", None, &json!({})).await;
        assert_eq!(404, s);

        // Snapshot goes through the Maintenance server by its gRPC path: UNIMPLEMENTED until
        // Keel has one, then a stream of blobs.
        let mut snap = Stream::whole(&a, "/v3/maintenance/snapshot", None, &[json!({})]).await;
        let first = snap.expect_line().await;
        match snap.status {
            501 => assert_eq!(json!(12), first["code"], "{first}"),
            200 => assert!(first["result"]["blob"].is_string(), "{first}"),
            other => panic!("snapshot answered {other}: {first}"),
        }
        drop(snap);

        // Election: campaign on a lease, observe the leader, resign.
        let (_, lease) = call(&a, "/v3/lease/grant", None, &json!({"TTL": 30})).await;
        let id = lease["ID"].clone();
        let (s, c) = call(
            &a,
            "/v3/election/campaign",
            None,
            &json!({"name": b64("e"), "lease": id, "value": b64("me")}),
        )
        .await;
        assert_eq!(200, s, "{c}");
        let mut obs = Stream::whole(&a, "/v3/election/observe", None, &[json!({"name": b64("e")})]).await;
        let line = obs.expect_line().await;
        assert_eq!(json!(b64("me")), line["result"]["kv"]["value"], "{line}");
        drop(obs);
        let (s, v) = call(&a, "/v3/election/leader", None, &json!({"name": b64("e")})).await;
        assert_eq!((200, json!(b64("me"))), (s, v["kv"]["value"].clone()), "{v}");
        let (s, v) = call(&a, "/v3/election/resign", None, &json!({"leader": c["leader"]})).await;
        assert_eq!(200, s, "{v}");

        // Lock and unlock by the key lock answered.
        let (s, l) = call(&a, "/v3beta/lock/lock", None, &json!({"name": b64("L"), "lease": id})).await;
        assert_eq!(200, s, "{l}");
        let (s, v) = call(&a, "/v3/lock/unlock", None, &json!({"key": l["key"]})).await;
        assert_eq!(200, s, "{v}");

        // A body over the limit is refused before it is read: the answer comes while the client
        // has sent only the header and a little of the body.
        let (s, v) = announce_large_body(&a, "/v3/kv/put", 8 << 20).await;
        assert_eq!((413, json!(3)), (s, v["code"].clone()), "{v}");
        // One over the gRPC limit once decoded is refused as gRPC refuses it.
        let value = base64::engine::general_purpose::STANDARD.encode(vec![b'x'; 2 << 20]);
        let (s, v) = call(&a, "/v3/kv/put", None, &json!({"key": b64("big"), "value": value})).await;
        assert_eq!((400, json!("etcdserver: request is too large")), (s, v["error"].clone()), "{v}");

        // Full duplex (which etcd's gateway is not over HTTP/1.1): requests sent while answers
        // come, then the request side closed while the watch goes on.
        let mut w = Stream::open(&a, "/v3/watch", None, &json!({"create_request": {"key": b64("k")}})).await;
        let created = w.expect_line().await;
        assert_eq!(
            (json!(true), json!(null)),
            (created["result"]["created"].clone(), created["result"]["watch_id"].clone()),
            "{created}"
        );
        w.send(&json!({"create_request": {"key": b64("k2")}})).await;
        let created = w.expect_line().await;
        assert_eq!(json!("1"), created["result"]["watch_id"], "{created}");
        // Past the client port's whole-body deadline, the stream's body is still read.
        tokio::time::sleep(BODY_DEADLINE * 2).await; // time passing is the point, not a sync
        w.send(&json!({"cancel_request": {"watch_id": "1"}})).await;
        let canceled = w.expect_line().await;
        assert_eq!(
            (json!("1"), json!(true)),
            (canceled["result"]["watch_id"].clone(), canceled["result"]["canceled"].clone()),
            "{canceled}"
        );
        // A message that is not a request ends the request side only.
        w.send(&json!("not a request")).await;
        let (s, _) = call(&a, "/v3/kv/put", None, &json!({"key": b64("k"), "value": b64("v")})).await;
        assert_eq!(200, s);
        let event = w.expect_line().await;
        assert_eq!(json!(b64("v")), event["result"]["events"][0]["kv"]["value"], "{event}");
        w.close_send();
        let (s, _) = call(&a, "/v3/kv/put", None, &json!({"key": b64("k"), "value": b64("w")})).await;
        assert_eq!(200, s);
        let event = w.expect_line().await;
        assert_eq!(json!(b64("w")), event["result"]["events"][0]["kv"]["value"], "{event}");
        drop(w);

        // Keep-alives sent one by one, each answered before the next is sent.
        let (_, l) = call(&a, "/v3/lease/grant", None, &json!({"TTL": 20})).await;
        let mut ka = Stream::open(&a, "/v3/lease/keepalive", None, &json!({"ID": l["ID"]})).await;
        for _ in 0..3 {
            let line = ka.expect_line().await;
            assert_eq!((&l["ID"], &json!("20")), (&line["result"]["ID"], &line["result"]["TTL"]), "{line}");
            ka.send(&json!({"ID": l["ID"]})).await;
        }
        drop(ka);

        // A first message that is not JSON: a unary error, as grpc-gateway answers it.
        let (s, v) = raw(&a, "/v3/watch", None, Full::new(Bytes::from_static(b"xx")).boxed()).await;
        assert_eq!((500, json!(2)), (s, v["code"].clone()), "{v}");
    });
}
