//! Auth state across a whole-cluster SIGKILL and across a snapshot install, with real keeld
//! processes: users, roles, permissions and the auth switch are all there afterwards, passwords
//! still check, and a token issued before the restart still works (the token key is replicated
//! state, not memory).

mod procs;

use etcd_client::Client;
use etcd_client::ConnectOptions;
use etcd_client::Permission;
use keel_kv::etcd::pb::etcdserverpb as rpc;
use procs::wait_until;
use procs::Procs;
use procs::DEADLINE;

const ALL: [u64; 3] = [1, 2, 3];

/// Users; alice's roles; role `reader`'s permissions (key, range end, type); auth on.
type State = (Vec<String>, Vec<String>, Vec<(Vec<u8>, Vec<u8>, i32)>, bool);

async fn connect(eps: &[String], user: Option<(&str, &str)>) -> Client {
    let eps: Vec<String> = eps.iter().map(|e| format!("http://{e}")).collect();
    let opts = user.map(|(u, p)| ConnectOptions::new().with_user(u, p));
    Client::connect(eps.clone(), opts).await.unwrap_or_else(|e| panic!("connect to {eps:?}: {e}"))
}

/// etcd's Auth service on one member, without a client library in between.
async fn raw_auth(ep: &str) -> rpc::auth_client::AuthClient<tonic::transport::Channel> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{ep}"))
        .expect("an endpoint")
        .connect()
        .await
        .expect("connect");
    rpc::auth_client::AuthClient::new(channel)
}

async fn token(ep: &str, name: &str, password: &str) -> Result<String, tonic::Status> {
    let req = rpc::AuthenticateRequest { name: name.into(), password: password.into() };
    Ok(raw_auth(ep).await.authenticate(req).await?.into_inner().token)
}

/// What a member holds: users, alice's roles, the role's permissions, and auth on or off.
async fn state(ep: &str) -> State {
    let mut c = connect(&[ep.to_string()], Some(("root", "rootpw"))).await;
    let users = c.user_list().await.expect("user list").users().to_vec();
    let roles = c.user_get("alice").await.expect("user get").roles().to_vec();
    let perms = c
        .role_get("reader")
        .await
        .expect("role get")
        .permissions()
        .iter()
        .map(|p| (p.key().to_vec(), p.range_end().to_vec(), p.get_type()))
        .collect();
    let mut a = raw_auth(ep).await;
    let enabled = a.auth_status(rpc::AuthStatusRequest {}).await.expect("auth status").into_inner().enabled;
    (users, roles, perms, enabled)
}

/// Users, a role with a prefix permission, alice holding it, auth on.
async fn set_up(eps: &[String]) {
    let mut c = connect(eps, None).await;
    c.user_add("root", "rootpw", None).await.expect("add root");
    c.user_grant_role("root", "root").await.expect("grant root");
    c.role_add("reader").await.expect("add role");
    c.role_grant_permission("reader", Permission::read("app/").with_prefix()).await.expect("grant");
    c.user_add("alice", "alicepw", None).await.expect("add alice");
    c.user_grant_role("alice", "reader").await.expect("grant reader");
    c.auth_enable().await.expect("enable");
}

fn expected() -> State {
    (
        vec!["alice".into(), "root".into()],
        vec!["reader".into()],
        vec![(b"app/".to_vec(), b"app0".to_vec(), 0)],
        true,
    )
}

#[test]
fn auth_state_and_tokens_survive_a_whole_cluster_kill() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut p = Procs::start(3, 0, "");
    let eps = p.clients(ALL);
    let before = rt.block_on(async {
        set_up(&eps).await;
        token(&eps[1], "alice", "alicepw").await.expect("a token")
    });
    p.kill_and_restart_all();
    rt.block_on(async {
        for ep in &eps {
            assert_eq!(expected(), state(ep).await, "member {ep}");
            assert!(token(ep, "alice", "alicepw").await.is_ok(), "alice's password checks on {ep}");
            let wrong = token(ep, "alice", "nope").await.expect_err("a wrong password");
            assert_eq!("etcdserver: authentication failed, invalid user ID or password", wrong.message());
        }
        // The token from before the restart: any member takes it (a UserGet of oneself).
        let mut a = raw_auth(&eps[2]).await;
        let mut req = tonic::Request::new(rpc::AuthUserGetRequest { name: "alice".into() });
        req.metadata_mut().insert("token", before.parse().expect("ASCII"));
        let roles = a.user_get(req).await.expect("user get with the old token").into_inner().roles;
        assert_eq!(vec!["reader".to_string()], roles);
    });
}

#[test]
fn a_follower_that_receives_auth_in_a_snapshot_serves_it() {
    // A snapshot every 200 entries, 10 kept behind it: what the follower misses is no longer in
    // the leader's log.
    let config = "[raft]\nsnapshot_every = 200\nlogs_to_keep_after_snapshot = 10\n";
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut p = Procs::start(3, 0, config);
    let leader = p.wait_leader(&ALL, DEADLINE);
    let behind = ALL.into_iter().find(|id| *id != leader).expect("a follower");
    p.kill(behind);
    let live_eps = p.clients(ALL.into_iter().filter(|id| *id != behind));
    rt.block_on(set_up(&live_eps));
    let set_up_at = p.status(leader).expect("status")["committed_index"].as_u64().expect("an index");
    rt.block_on(async {
        let mut c = connect(&live_eps, Some(("root", "rootpw"))).await;
        for i in 0..400 {
            c.put(format!("fill/{i:03}"), "v", None).await.expect("put");
        }
    });
    wait_until("the leader purges its log past the auth changes", DEADLINE, || {
        let st = p.status(leader)?;
        // Purged, not only snapshotted: the leader keeps entries a replication stream still
        // reads (the stopped follower's, until it gives up), and then the follower would catch
        // up from the log.
        match st["purged_index"].as_u64() {
            Some(purged) if purged > set_up_at => Ok(()),
            _ => Err(st.to_string()),
        }
    });
    p.restart(behind);
    p.wait_ready(behind);
    p.wait_caught_up(behind, leader);
    let log = std::fs::read_to_string(&p.node(behind).log).expect("read the node's log");
    assert!(log.contains("installed snapshot"), "node {behind} caught up without a snapshot:\n{log}");
    rt.block_on(async {
        let ep = p.client(behind);
        assert_eq!(expected(), state(&ep).await, "node {behind}");
        assert!(token(&ep, "alice", "alicepw").await.is_ok(), "alice's password checks on node {behind}");
    });
}
