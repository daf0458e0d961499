//! Auth enforced on an in-process three-node cluster, through etcd's gRPC API with the token set by
//! hand: a token from one member works on every member; a password change or deleting the user
//! ends it at once; a revoked role denies the very next request, on a follower too; a txn with one
//! forbidden op is refused whole; a watch or a lock on a forbidden range is refused; admin calls need root;
//! etcd's errors for a missing or bad token. And the HTTP API's bearer and basic credentials.

mod support;

use etcd_client::Client;
use etcd_client::ConnectOptions;
use etcd_client::Permission;
use keel_kv::etcd::pb::etcdserverpb as rpc;
use support::Cluster;
use tonic::transport::Channel;
use tonic::Code;

async fn channel(endpoint: &str) -> Channel {
    Channel::from_shared(endpoint.to_string()).expect("an endpoint").connect().await.expect("connect")
}

/// `msg` with `token` as etcd clients send it.
fn with<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut().insert("token", t.parse().expect("an ASCII token"));
    }
    r
}

async fn token(endpoint: &str, name: &str, password: &str) -> String {
    let mut a = rpc::auth_client::AuthClient::new(channel(endpoint).await);
    let req = rpc::AuthenticateRequest { name: name.into(), password: password.into() };
    a.authenticate(req).await.expect("authenticate").into_inner().token
}

fn put(key: &str) -> rpc::PutRequest {
    rpc::PutRequest { key: key.into(), value: b"v".to_vec(), ..Default::default() }
}

fn get(key: &str) -> rpc::RangeRequest {
    rpc::RangeRequest { key: key.into(), ..Default::default() }
}

#[track_caller]
fn assert_refused<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, message: &str) {
    let e = r.expect_err(message);
    assert_eq!((code, message), (e.code(), e.message()), "{e:?}");
}

/// root (role root), alice (role `app`: read and write on `a/`), auth on.
async fn set_up(c: &Cluster) {
    let mut cl = Client::connect([c.endpoint(c.leader())], None).await.expect("connect");
    cl.user_add("root", "rootpw", None).await.expect("add root");
    cl.user_grant_role("root", "root").await.expect("grant root");
    cl.role_add("app").await.expect("add role");
    cl.role_grant_permission("app", Permission::read_write("a/").with_prefix()).await.expect("grant");
    cl.user_add("alice", "alicepw", None).await.expect("add alice");
    cl.user_grant_role("alice", "app").await.expect("grant app");
    cl.auth_enable().await.expect("enable");
}

async fn root_client(c: &Cluster) -> Client {
    let opts = ConnectOptions::new().with_user("root", "rootpw");
    Client::connect([c.endpoint(c.leader())], Some(opts)).await.expect("connect as root")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_work_everywhere_and_end_with_the_password_or_the_user() {
    let c = Cluster::start(3, |_| {}).await;
    set_up(&c).await;
    let (leader, follower) = (c.endpoint(c.leader()), c.endpoint(c.follower()));
    let t = token(&leader, "alice", "alicepw").await;
    let mut kv = rpc::kv_client::KvClient::new(channel(&follower).await);
    kv.put(with(put("a/1"), Some(&t))).await.expect("a put alice may make, on a follower");
    kv.range(with(get("a/1"), Some(&t))).await.expect("a read alice may make");
    assert_refused(
        kv.put(with(put("b/1"), Some(&t))).await,
        Code::PermissionDenied,
        "etcdserver: permission denied",
    );
    assert_refused(
        kv.range(with(get("b/1"), Some(&t))).await,
        Code::PermissionDenied,
        "etcdserver: permission denied",
    );
    assert_refused(
        kv.put(with(put("a/1"), None)).await,
        Code::InvalidArgument,
        "etcdserver: user name is empty",
    );
    assert_refused(
        kv.put(with(put("a/1"), Some("forged"))).await,
        Code::Unauthenticated,
        "etcdserver: invalid auth token",
    );

    // A new password: the old token is refused at once, everywhere; a new one works.
    let mut root = root_client(&c).await;
    root.user_change_password("alice", "alicepw2").await.expect("change the password");
    for ep in [&leader, &follower] {
        let mut kv = rpc::kv_client::KvClient::new(channel(ep).await);
        assert_refused(
            kv.range(with(get("a/1"), Some(&t))).await,
            Code::Unauthenticated,
            "etcdserver: invalid auth token",
        );
    }
    let t2 = token(&follower, "alice", "alicepw2").await;
    kv.range(with(get("a/1"), Some(&t2))).await.expect("the new token works");

    // Deleted, then added again under the same name: no old token comes back.
    root.user_delete("alice").await.expect("delete alice");
    root.user_add("alice", "alicepw2", None).await.expect("add alice again");
    root.user_grant_role("alice", "app").await.expect("grant app");
    assert_refused(
        kv.range(with(get("a/1"), Some(&t2))).await,
        Code::Unauthenticated,
        "etcdserver: invalid auth token",
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_role_denies_the_next_request_and_a_txn_is_judged_whole() {
    let c = Cluster::start(3, |_| {}).await;
    set_up(&c).await;
    let follower = c.endpoint(c.follower());
    let t = token(&follower, "alice", "alicepw").await;
    let mut kv = rpc::kv_client::KvClient::new(channel(&follower).await);

    // One op outside `a/`, in the branch that does not run: the whole txn is refused, nothing written.
    let op = |key: &str| rpc::RequestOp { request: Some(rpc::request_op::Request::RequestPut(put(key))) };
    let txn = rpc::TxnRequest { compare: vec![], success: vec![op("a/1")], failure: vec![op("b/1")] };
    assert_refused(
        kv.txn(with(txn, Some(&t))).await,
        Code::PermissionDenied,
        "etcdserver: permission denied",
    );
    let seen = kv.range(with(get("a/1"), Some(&t))).await.expect("read").into_inner();
    assert_eq!(0, seen.count, "the refused txn wrote nothing");
    let txn = rpc::TxnRequest { compare: vec![], success: vec![op("a/1"), op("a/2")], failure: vec![] };
    assert!(kv.txn(with(txn, Some(&t))).await.expect("a txn within a/").into_inner().succeeded);

    // Revoked through the leader; the follower's very next read and write are refused.
    root_client(&c).await.user_revoke_role("alice", "app").await.expect("revoke");
    assert_refused(
        kv.range(with(get("a/1"), Some(&t))).await,
        Code::PermissionDenied,
        "etcdserver: permission denied",
    );
    assert_refused(
        kv.put(with(put("a/1"), Some(&t))).await,
        Code::PermissionDenied,
        "etcdserver: permission denied",
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watches_and_admin_calls_need_their_permissions() {
    let c = Cluster::start(3, |_| {}).await;
    set_up(&c).await;
    let ep = c.endpoint(c.follower());
    let t = token(&ep, "alice", "alicepw").await;
    let rt = token(&ep, "root", "rootpw").await;

    let mut w = rpc::watch_client::WatchClient::new(channel(&ep).await);
    let create = |key: &str, id: i64| rpc::WatchRequest {
        request_union: Some(rpc::watch_request::RequestUnion::CreateRequest(rpc::WatchCreateRequest {
            key: key.into(),
            range_end: vec![0],
            watch_id: id,
            ..Default::default()
        })),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut stream =
        w.watch(with(tokio_stream_from(rx), Some(&t))).await.expect("a watch stream").into_inner();
    tx.send(create("b/", 7)).await.expect("send");
    let r = stream.message().await.expect("an answer").expect("an answer");
    assert!(r.created && r.canceled, "{r:?}");
    assert_eq!((7, "etcdserver: permission denied"), (r.watch_id, r.cancel_reason.as_str()));
    // From `a/` on to the end of the key space is not all inside `a/` either; [a/, a0) is.
    let mut within = create("a/", 8);
    if let Some(rpc::watch_request::RequestUnion::CreateRequest(c)) = &mut within.request_union {
        c.range_end = b"a0".to_vec();
    }
    tx.send(within).await.expect("send");
    let r = stream.message().await.expect("an answer").expect("an answer");
    assert!(r.created && !r.canceled, "{r:?}");

    let mut cluster = rpc::cluster_client::ClusterClient::new(channel(&ep).await);
    let add = rpc::MemberAddRequest { peer_ur_ls: vec!["http://127.0.0.1:1".into()], is_learner: true };
    assert_refused(
        cluster.member_add(with(add, Some(&t))).await,
        Code::PermissionDenied,
        "etcdserver: permission denied",
    );
    cluster
        .member_list(with(rpc::MemberListRequest::default(), Some(&t)))
        .await
        .expect("member list is open");
    let mut m = rpc::maintenance_client::MaintenanceClient::new(channel(&ep).await);
    assert_refused(
        m.hash_kv(with(rpc::HashKvRequest::default(), Some(&t))).await,
        Code::PermissionDenied,
        "etcdserver: permission denied",
    );
    m.hash_kv(with(rpc::HashKvRequest::default(), Some(&rt))).await.expect("root may hash");
    m.status(with(rpc::StatusRequest::default(), None)).await.expect("status is open");
    let mut a = rpc::auth_client::AuthClient::new(channel(&ep).await);
    assert_refused(
        a.user_list(with(rpc::AuthUserListRequest {}, Some(&t))).await,
        Code::PermissionDenied,
        "etcdserver: permission denied",
    );
    let me = a.user_get(with(rpc::AuthUserGetRequest { name: "alice".into() }, Some(&t))).await;
    assert_eq!(vec!["app".to_string()], me.expect("alice may read herself").into_inner().roles);
    a.role_get(with(rpc::AuthRoleGetRequest { role: "app".into() }, Some(&t)))
        .await
        .expect("a role alice holds");
    let add = rpc::AuthUserAddRequest { name: "eve".into(), password: "x".into(), options: None };
    assert_refused(
        a.user_add(with(add, Some(&t))).await,
        Code::PermissionDenied,
        "etcdserver: permission denied",
    );

    // Locks: the recipe's keys are the user's to touch, or not.
    use keel_kv::etcd::pb::v3lockpb as lock;
    let mut l = lock::lock_client::LockClient::new(channel(&ep).await);
    let req = |name: &str| lock::LockRequest { name: name.into(), lease: 0 };
    assert_refused(
        l.lock(with(req("b/lk"), Some(&t))).await,
        Code::PermissionDenied,
        "etcdserver: permission denied",
    );
    let held = l.lock(with(req("a/lk"), Some(&t))).await.expect("a lock under a/").into_inner().key;
    l.unlock(with(lock::UnlockRequest { key: held }, Some(&t))).await.expect("unlock");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_http_api_takes_bearer_tokens_and_basic_credentials_and_judges_permissions() {
    let c = Cluster::start(1, |_| {}).await;
    set_up(&c).await;
    let base = c.endpoint(1);
    let http = |method: &str, path: &str, auth: Option<String>, body: &str| {
        let (method, url, body) = (method.to_string(), format!("{base}{path}"), body.to_string());
        async move {
            let mut req = hyper_request(&method, &url, auth, body);
            req.headers_mut().insert("content-type", "application/json".parse().expect("header"));
            send(req).await
        }
    };
    let (status, _) = http("GET", "/v1/kv/a/1", None, "").await;
    assert_eq!(401, status, "no credentials");
    let (status, body) =
        http("POST", "/v1/auth/authenticate", None, r#"{"name":"root","password":"rootpw"}"#).await;
    assert_eq!(200, status, "{body}");
    let token = serde_json::from_str::<serde_json::Value>(&body).expect("JSON")["token"]
        .as_str()
        .expect("a token")
        .to_string();
    let (status, body) = http("PUT", "/v1/kv/a/1", Some(format!("Bearer {token}")), "v").await;
    assert_eq!(200, status, "{body}");
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode("root:rootpw");
    let (status, body) = http("GET", "/v1/kv/a/1", Some(format!("Basic {basic}")), "").await;
    assert_eq!(200, status, "{body}");
    let wrong = base64::engine::general_purpose::STANDARD.encode("root:nope");
    assert_eq!(401, http("GET", "/v1/kv/a/1", Some(format!("Basic {wrong}")), "").await.0);
    let (status, body) =
        http("POST", "/v1/auth/authenticate", None, r#"{"name":"alice","password":"alicepw"}"#).await;
    assert_eq!(200, status, "{body}");
    let alice = serde_json::from_str::<serde_json::Value>(&body).expect("JSON")["token"]
        .as_str()
        .expect("a token")
        .to_string();
    // alice (read and write on `a/`) on the key routes: by her permissions, as on gRPC.
    let bearer = Some(format!("Bearer {alice}"));
    let (status, body) = http("GET", "/v1/kv/a/1", bearer.clone(), "").await;
    assert_eq!(200, status, "{body}");
    assert_eq!(200, http("PUT", "/v1/kv/a/2", bearer.clone(), "w").await.0);
    let (status, body) = http("GET", "/v1/kv?prefix=a/", bearer.clone(), "").await;
    assert_eq!(200, status, "{body}");
    assert_eq!(2, serde_json::from_str::<serde_json::Value>(&body).expect("JSON")["count"], "{body}");
    let denied = |(status, body): (u16, String)| {
        assert_eq!(403, status, "{body}");
        assert!(body.contains("permission denied"), "{body}");
    };
    denied(http("GET", "/v1/kv/b", bearer.clone(), "").await);
    denied(http("PUT", "/v1/kv/b", bearer.clone(), "x").await);
    denied(http("DELETE", "/v1/kv/b", bearer.clone(), "").await);
    denied(http("GET", "/v1/kv?prefix=", bearer.clone(), "").await);
    denied(http("GET", "/v1/watch?prefix=b", bearer.clone(), "").await);
    // A txn with one op outside her keys is refused whole.
    let txn = r#"{"success":[{"put":{"key":"a/3","value":"v"}},{"put":{"key":"b","value":"v"}}]}"#;
    denied(http("POST", "/v1/txn", bearer.clone(), txn).await);
    assert_eq!(
        404,
        http("GET", "/v1/kv/a/3", Some(format!("Bearer {token}")), "").await.0,
        "the txn's put applied"
    );
    // Deleting her own keys is hers to do; the admin routes are root's.
    assert_eq!(200, http("DELETE", "/v1/kv/a/2", bearer.clone(), "").await.0);
    denied(http("GET", "/v1/alarms", bearer.clone(), "").await);
    denied(http("POST", "/v1/compact?revision=2", bearer.clone(), "").await);
    assert_eq!(200, http("GET", "/v1/cluster/status", None, "").await.0);
    assert_eq!(200, http("GET", "/health", None, "").await.0);
    c.shutdown().await;
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn hyper_request(method: &str, url: &str, auth: Option<String>, body: String) -> hyper::Request<String> {
    let mut b = hyper::Request::builder().method(method).uri(url);
    if let Some(a) = auth {
        b = b.header("authorization", a);
    }
    b.body(body).expect("a request")
}

/// Sends `req` over a fresh HTTP/1.1 connection; answers the status and the body.
async fn send(req: hyper::Request<String>) -> (u16, String) {
    use http_body_util::BodyExt;
    let uri = req.uri().clone();
    let addr = format!("{}:{}", uri.host().expect("a host"), uri.port_u16().expect("a port"));
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    let resp = sender
        .send_request(req.map(|b| http_body_util::Full::new(hyper::body::Bytes::from(b))))
        .await
        .expect("send");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}
