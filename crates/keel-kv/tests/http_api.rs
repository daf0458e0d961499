//! The HTTP/JSON API with real HTTP requests against a 3-node cluster: key-value, txn, admin,
//! operations endpoints, and bad input answered with the documented error while the node keeps
//! serving.

mod support;

use http_body_util::BodyExt;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::Method;
use hyper::Request;
use hyper::StatusCode;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use serde_json::Value;
use support::Cluster;

struct Http {
    base: String,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl Http {
    fn new(c: &Cluster, id: u64) -> Self {
        Self { base: c.endpoint(id), client: Client::builder(TokioExecutor::new()).build_http() }
    }

    async fn raw(&self, method: Method, path: &str, body: impl Into<Bytes>) -> (StatusCode, Vec<u8>) {
        let req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .body(Full::new(body.into()))
            .expect("request");
        let resp = self.client.request(req).await.expect("HTTP request");
        let status = resp.status();
        (status, resp.into_body().collect().await.expect("body").to_bytes().to_vec())
    }

    async fn call(&self, method: Method, path: &str, body: impl Into<Bytes>) -> (StatusCode, Value) {
        let (status, body) = self.raw(method, path, body).await;
        let json = serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!("{path}: answer is not JSON ({e}): {}", String::from_utf8_lossy(&body))
        });
        (status, json)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, Bytes::new()).await
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, body.to_string()).await
    }
}

fn error_code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or_else(|| panic!("no error code in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_value_and_txn_over_http() {
    let c = Cluster::start(3, |_| {}).await;
    let h = Http::new(&c, c.follower());

    let (s, put) = h.call(Method::PUT, "/v1/kv/greeting", "hello").await;
    assert_eq!(StatusCode::OK, s, "{put}");
    let rev = put["revision"].as_i64().expect("revision");
    let (s, got) = h.get("/v1/kv/greeting").await;
    assert_eq!(StatusCode::OK, s);
    assert_eq!(
        (json!("greeting"), json!("hello"), json!(rev), json!(1)),
        (got["key"].clone(), got["value"].clone(), got["mod_revision"].clone(), got["version"].clone())
    );

    // Keys with slashes and bytes that are not UTF-8 round-trip.
    h.call(Method::PUT, "/v1/kv/dir/a%2Fb", "x").await;
    let (s, got) = h.get("/v1/kv/dir%2Fa/b").await;
    assert_eq!((StatusCode::OK, json!("x")), (s, got["value"].clone()));
    let (s, _) = h.call(Method::PUT, "/v1/kv/bin", vec![0xffu8, 0x00]).await;
    assert_eq!(StatusCode::OK, s);
    let (_, got) = h.get("/v1/kv/bin").await;
    assert_eq!(json!("/wA="), got["value_base64"]);

    for k in ["p/1", "p/2", "p/3"] {
        h.call(Method::PUT, &format!("/v1/kv/{k}"), k.to_string()).await;
    }
    let (s, list) = h.get("/v1/kv?prefix=p/&limit=2").await;
    assert_eq!(StatusCode::OK, s);
    assert_eq!(
        (2, json!(3), json!(true)),
        (list["kvs"].as_array().expect("kvs").len(), list["count"].clone(), list["more"].clone())
    );
    let (_, keys) = h.get("/v1/kv?prefix=p/&keys_only=true&consistency=serializable").await;
    assert!(keys["kvs"].as_array().expect("kvs").iter().all(|kv| kv.get("value").is_none()));

    let txn = json!({
        "compare": [{"key": "greeting", "target": "value", "result": "equal", "value": "hello"}],
        "success": [{"put": {"key": "greeting", "value": "bye"}}, {"get": {"key": "greeting"}}],
        "failure": [{"delete": {"key": "greeting"}}]
    });
    let (s, t) = h.post("/v1/txn", txn.clone()).await;
    assert_eq!((StatusCode::OK, json!(true)), (s, t["succeeded"].clone()), "{t}");
    assert_eq!(json!("bye"), t["responses"][1]["get"]["kvs"][0]["value"]);
    let (_, t) = h.post("/v1/txn", txn).await;
    assert_eq!(json!(false), t["succeeded"], "the compare fails the second time");
    let (s, gone) = h.get("/v1/kv/greeting").await;
    assert_eq!(
        (StatusCode::NOT_FOUND, "key_not_found"),
        (s, error_code(&gone)),
        "the failure branch deleted it"
    );

    let (s, del) = h.call(Method::DELETE, "/v1/kv/p/?prefix=true&prev_kv=true", Bytes::new()).await;
    assert_eq!((StatusCode::OK, json!(3)), (s, del["deleted"].clone()), "{del}");
    assert_eq!(3, del["prev_kvs"].as_array().expect("prev_kvs").len());
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_documented_errors_and_the_node_keeps_serving() {
    let c = Cluster::start(3, |cfg| cfg.max_request_bytes = 64 * 1024).await;
    let h = Http::new(&c, c.leader());
    let cases: Vec<(Method, &str, Vec<u8>, StatusCode, &str)> = vec![
        (
            Method::PUT,
            "/v1/kv/big",
            vec![b'v'; 65 * 1024],
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
        ),
        (Method::PUT, "/v1/kv/empty-value-is-fine", vec![], StatusCode::OK, ""),
        (Method::POST, "/v1/txn", b"{not json".to_vec(), StatusCode::BAD_REQUEST, "bad_request"),
        (
            Method::POST,
            "/v1/txn",
            br#"{"compare": [{"key": "a", "target": "colour", "result": "equal"}]}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (Method::POST, "/v1/txn", br#"{"surprise": 1}"#.to_vec(), StatusCode::BAD_REQUEST, "bad_request"),
        (Method::GET, "/v1/kv?limit=-3&prefix=a", vec![], StatusCode::BAD_REQUEST, "bad_request"),
        (
            Method::GET,
            "/v1/kv?prefix=a&consistency=sometimes",
            vec![],
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (Method::GET, "/v1/kv", vec![], StatusCode::BAD_REQUEST, "bad_request"),
        (Method::GET, "/v1/kv/missing", vec![], StatusCode::NOT_FOUND, "key_not_found"),
        (
            Method::POST,
            "/v1/cluster/remove",
            br#"{"id": 42}"#.to_vec(),
            StatusCode::NOT_FOUND,
            "unknown_member",
        ),
        (
            Method::POST,
            "/v1/cluster/promote",
            br#"{"id": 42}"#.to_vec(),
            StatusCode::NOT_FOUND,
            "unknown_member",
        ),
        (
            Method::POST,
            "/v1/cluster/transfer-leader",
            br#"{"id": 42}"#.to_vec(),
            StatusCode::NOT_FOUND,
            "unknown_member",
        ),
        (
            Method::POST,
            "/v1/cluster/change-membership",
            br#"{"voters": [1, 42]}"#.to_vec(),
            StatusCode::NOT_FOUND,
            "unknown_member",
        ),
        (
            Method::POST,
            "/v1/cluster/add-learner",
            br#"{"id": 1, "peer_addr": "127.0.0.1:1"}"#.to_vec(),
            StatusCode::CONFLICT,
            "rejected",
        ),
        (
            Method::POST,
            "/v1/cluster/add-learner",
            br#"{"id": 9, "peer_addr": "nohost"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (Method::POST, "/v1/cluster/init", vec![], StatusCode::CONFLICT, "rejected"),
        (Method::GET, "/v1/nowhere", vec![], StatusCode::NOT_FOUND, "not_found"),
    ];
    for (method, path, body, status, code) in cases {
        let (s, answer) = h.raw(method.clone(), path, body).await;
        let text = String::from_utf8_lossy(&answer).into_owned();
        assert_eq!(status, s, "{method} {path}: {text}");
        if !code.is_empty() {
            let v: Value =
                serde_json::from_slice(&answer).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}"));
            assert_eq!(code, error_code(&v), "{method} {path}: {text}");
            assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{text}");
            assert_eq!(json!(false), v["error"]["retryable"], "{text}");
        }
        // After every bad request the node still serves writes and reads.
        let (s, _) = h.call(Method::PUT, "/v1/kv/alive", "yes").await;
        assert_eq!(StatusCode::OK, s, "after {method} {path}");
    }
    // A key over the limit (8 KiB by default) is refused.
    let (s, v) = h.call(Method::PUT, &format!("/v1/kv/{}", "k".repeat(9000)), "v").await;
    assert_eq!((StatusCode::PAYLOAD_TOO_LARGE, "key_too_large"), (s, error_code(&v)));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_status_and_operations_endpoints() {
    let c = Cluster::start(3, |_| {}).await;
    let leader = c.leader();
    let h = Http::new(&c, c.follower());

    let (s, m) = h.get("/v1/cluster/members").await;
    assert_eq!((StatusCode::OK, json!(leader)), (s, m["leader"].clone()));
    assert_eq!(3, m["members"].as_array().expect("members").len());
    assert!(m["members"]
        .as_array()
        .expect("members")
        .iter()
        .all(|m| m["voter"] == json!(true) && m["client_addr"].as_str().is_some_and(|a| !a.is_empty())));

    let (_, st) = Http::new(&c, leader).get("/v1/cluster/status").await;
    assert_eq!((json!("leader"), json!(leader)), (st["state"].clone(), st["leader"].clone()), "{st}");
    assert_eq!(2, st["replication"].as_object().expect("replication on the leader").len(), "{st}");
    let (_, st) = h.get("/v1/cluster/status").await;
    assert_eq!(json!("follower"), st["state"]);
    assert!(st.get("replication").is_none(), "followers report no replication");

    // A learner through the HTTP admin API, then removed.
    let peer = format!("127.0.0.1:{}", support::free_port());
    let (s, v) = h.post("/v1/cluster/add-learner", json!({"id": 7, "peer_addr": peer})).await;
    assert_eq!(StatusCode::OK, s, "{v}");
    assert!(v["members"]
        .as_array()
        .expect("members")
        .iter()
        .any(|m| m["id"] == json!(7) && m["voter"] == json!(false)));
    let (s, v) = h.post("/v1/cluster/promote", json!({"id": 7})).await;
    assert_eq!(
        (StatusCode::CONFLICT, "learner_not_ready"),
        (s, error_code(&v)),
        "a learner that never ran is not in sync: {v}"
    );
    let (s, _) = h.post("/v1/cluster/remove", json!({"id": 7})).await;
    assert_eq!(StatusCode::OK, s);

    let target = c.follower();
    let (s, v) = h.post("/v1/cluster/transfer-leader", json!({"id": target})).await;
    assert_eq!((StatusCode::OK, json!(target)), (s, v["leader"].clone()), "{v}");

    // Right after a leader change a node may briefly be catching up: wait for ready, bounded.
    let deadline = tokio::time::Instant::now() + support::WAIT;
    loop {
        let (s, v) = h.get("/ready").await;
        if s == StatusCode::OK {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never ready: {v}");
        c.servers[&target]
            .node()
            .wait_for(std::time::Duration::from_millis(100), "any change", |_| false)
            .await
            .ok();
    }
    let (s, v) = h.get("/health").await;
    assert_eq!((StatusCode::OK, json!("true")), (s, v["health"].clone()));
    let (s, text) = h.raw(Method::GET, "/metrics", Bytes::new()).await;
    let text = String::from_utf8(text).expect("utf8");
    assert_eq!(StatusCode::OK, s);
    for metric in [
        "keel_raft_term ",
        "keel_raft_applied_index ",
        "keel_kv_revision ",
        "keel_requests_total{api=\"http\"} ",
    ] {
        assert!(text.contains(metric), "missing {metric} in\n{text}");
    }
    c.shutdown().await;
}
