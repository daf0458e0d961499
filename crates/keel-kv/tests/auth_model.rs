//! Auth against a model: random user, role and permission changes applied to the KV state machine
//! must answer as etcd's rules say (a `BTreeMap` model), and random requests must be permitted
//! exactly when the model says so. The model decides coverage its own way: a range is covered
//! iff its start and every grant boundary inside it lie in some granted interval (the union of
//! intervals can only change membership at a boundary), where the implementation sweeps sorted
//! intervals. Snapshot and restore must keep every answer.

use std::collections::BTreeMap;
use std::collections::BTreeSet;

use keel::redb::Database;
use keel::redb::ReadableDatabase;
use keel::StateMachine;
use keel_kv::auth::AuthCommand;
use keel_kv::auth::AuthError;
use keel_kv::auth::AuthView;
use keel_kv::auth::PermType;
use keel_kv::auth::Permission;
use keel_kv::store::KvCommand;
use keel_kv::store::KvError;
use keel_kv::store::KvStore;
use keel_kv::store::OpResult;
use proptest::prelude::*;

const USERS: &[&str] = &["root", "alice", "bob", ""];
const ROLES: &[&str] = &["root", "r1", "r2", ""];

/// A role's permissions: (key, range_end) → type.
type Perms = BTreeMap<(Vec<u8>, Vec<u8>), PermType>;

#[derive(Default, Debug)]
struct Model {
    enabled: bool,
    revision: u64,
    /// user → roles
    users: BTreeMap<String, BTreeSet<String>>,
    /// role → (key, range_end) → type
    roles: BTreeMap<String, Perms>,
}

impl Model {
    fn apply(&mut self, cmd: &AuthCommand) -> Result<(), AuthError> {
        use AuthError as E;
        let changed = match cmd {
            AuthCommand::Enable { .. } => {
                if self.enabled {
                    false
                } else {
                    let root = self.users.get("root").ok_or(E::RootUserNotExist)?;
                    if !root.contains("root") {
                        return Err(E::RootRoleNotExist);
                    }
                    self.enabled = true;
                    true
                }
            }
            AuthCommand::Disable => std::mem::replace(&mut self.enabled, false),
            AuthCommand::UserAdd { name, .. } => {
                if name.is_empty() {
                    return Err(E::UserEmpty);
                }
                if self.users.contains_key(name) {
                    return Err(E::UserAlreadyExist);
                }
                self.users.insert(name.clone(), BTreeSet::new());
                true
            }
            AuthCommand::UserDelete { name } => {
                if self.enabled && name == "root" {
                    return Err(E::InvalidAuthMgmt);
                }
                self.users.remove(name).ok_or(E::UserNotFound)?;
                true
            }
            AuthCommand::UserChangePassword { name, .. } => {
                self.users.get(name).ok_or(E::UserNotFound)?;
                true
            }
            AuthCommand::UserGrantRole { user, role } => {
                let exists = self.roles.contains_key(role);
                let roles = self.users.get_mut(user).ok_or(E::UserNotFound)?;
                if role != "root" && !exists {
                    return Err(E::RoleNotFound);
                }
                roles.insert(role.clone())
            }
            AuthCommand::UserRevokeRole { user, role } => {
                if self.enabled && user == "root" && role == "root" {
                    return Err(E::InvalidAuthMgmt);
                }
                let roles = self.users.get_mut(user).ok_or(E::UserNotFound)?;
                if !roles.remove(role) {
                    return Err(E::RoleNotGranted);
                }
                true
            }
            AuthCommand::RoleAdd { name } => {
                if name.is_empty() {
                    return Err(E::RoleEmpty);
                }
                if self.roles.contains_key(name) {
                    return Err(E::RoleAlreadyExist);
                }
                self.roles.insert(name.clone(), BTreeMap::new());
                true
            }
            AuthCommand::RoleDelete { name } => {
                if self.enabled && name == "root" {
                    return Err(E::InvalidAuthMgmt);
                }
                self.roles.remove(name).ok_or(E::RoleNotFound)?;
                for roles in self.users.values_mut() {
                    roles.remove(name);
                }
                true
            }
            AuthCommand::RoleGrantPermission { role, perm } => {
                let perms = self.roles.get_mut(role).ok_or(E::RoleNotFound)?;
                perms.insert((perm.key.clone(), perm.range_end.clone()), perm.perm_type);
                true
            }
            AuthCommand::RoleRevokePermission { role, key, range_end } => {
                let perms = self.roles.get_mut(role).ok_or(E::RoleNotFound)?;
                perms.remove(&(key.clone(), range_end.clone())).ok_or(E::PermissionNotGranted)?;
                true
            }
        };
        if changed {
            self.revision += 1;
        }
        Ok(())
    }

    /// `None` end: past every key.
    fn span(key: &[u8], range_end: &[u8]) -> (Vec<u8>, Option<Vec<u8>>) {
        match range_end {
            [] => (key.to_vec(), Some([key, &[0]].concat())),
            [0] => (key.to_vec(), None),
            e => (key.to_vec(), Some(e.to_vec())),
        }
    }

    fn inside(p: &[u8], (s, e): &(Vec<u8>, Option<Vec<u8>>)) -> bool {
        s.as_slice() <= p && e.as_ref().is_none_or(|e| p < e.as_slice())
    }

    fn permitted(&self, user: &str, key: &[u8], range_end: &[u8], need: PermType) -> bool {
        let Some(roles) = self.users.get(user) else { return false };
        if roles.contains("root") {
            return true;
        }
        let grants: Vec<(Vec<u8>, Option<Vec<u8>>)> = roles
            .iter()
            .filter_map(|r| self.roles.get(r))
            .flat_map(|perms| perms.iter())
            .filter(|(_, t)| **t == need || **t == PermType::ReadWrite)
            .map(|((k, e), _)| Self::span(k, e))
            .collect();
        let mut request = Self::span(key, range_end);
        if request.1.as_ref().is_some_and(|e| e.as_slice() <= key) {
            request = Self::span(key, &[]);
        }
        let mut points: Vec<&[u8]> = vec![key];
        for (s, e) in &grants {
            points.push(s);
            if let Some(e) = e {
                points.push(e);
            }
        }
        points
            .into_iter()
            .filter(|p| Self::inside(p, &request))
            .all(|p| grants.iter().any(|g| Self::inside(p, g)))
    }
}

fn key() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop::sample::select(vec![b'a', b'b', b'c', 0u8]), 0..3)
}

fn range_end() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![Just(vec![]), Just(vec![0]), key()]
}

fn perm_type() -> impl Strategy<Value = PermType> {
    prop::sample::select(vec![PermType::Read, PermType::Write, PermType::ReadWrite])
}

fn name(set: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop::sample::select(set).prop_map(str::to_string)
}

fn command() -> impl Strategy<Value = AuthCommand> {
    prop_oneof![
        1 => Just(AuthCommand::Enable { secret: [7; 32] }),
        1 => Just(AuthCommand::Disable),
        3 => name(USERS).prop_map(|name| AuthCommand::UserAdd { name, password_hash: Some("h".into()) }),
        1 => name(USERS).prop_map(|name| AuthCommand::UserDelete { name }),
        1 => name(USERS).prop_map(|name| AuthCommand::UserChangePassword { name, password_hash: "h2".into() }),
        4 => (name(USERS), name(ROLES)).prop_map(|(user, role)| AuthCommand::UserGrantRole { user, role }),
        1 => (name(USERS), name(ROLES)).prop_map(|(user, role)| AuthCommand::UserRevokeRole { user, role }),
        3 => name(ROLES).prop_map(|name| AuthCommand::RoleAdd { name }),
        1 => name(ROLES).prop_map(|name| AuthCommand::RoleDelete { name }),
        6 => (name(ROLES), perm_type(), key(), range_end()).prop_map(|(role, perm_type, key, range_end)| {
            AuthCommand::RoleGrantPermission { role, perm: Permission { perm_type, key, range_end } }
        }),
        2 => (name(ROLES), key(), range_end())
            .prop_map(|(role, key, range_end)| AuthCommand::RoleRevokePermission { role, key, range_end }),
    ]
}

fn request() -> impl Strategy<Value = (String, Vec<u8>, Vec<u8>, PermType)> {
    (name(USERS), key(), range_end(), prop::sample::select(vec![PermType::Read, PermType::Write]))
}

fn memory_db() -> Database {
    Database::builder()
        .create_with_backend(keel::redb::backends::InMemoryBackend::new())
        .expect("in-memory db")
}

/// Every request's answer, the user list and the auth status as one comparable value.
fn judge(
    db: &Database,
    requests: &[(String, Vec<u8>, Vec<u8>, PermType)],
) -> (Vec<bool>, Vec<String>, bool, u64) {
    let read = db.begin_read().expect("read txn");
    let view = AuthView::open(&read).expect("auth view");
    let answers =
        requests.iter().map(|(u, k, e, t)| view.permitted(u, k, e, *t).expect("permitted")).collect();
    let status = view.status().expect("status");
    (answers, view.user_names().expect("users"), status.enabled, status.revision)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn auth_agrees_with_model(
        cmds in prop::collection::vec(command(), 1..40),
        requests in prop::collection::vec(request(), 1..40),
    ) {
        let db = memory_db();
        let mut model = Model { revision: 1, ..Model::default() };
        for cmd in cmds {
            let expected = model.apply(&cmd);
            let txn = db.begin_write().expect("write txn");
            let got = KvStore::default().apply(&txn, vec![KvCommand::Auth(cmd.clone())]).expect("apply");
            txn.commit().expect("commit");
            let got = match &got[0].result {
                Ok(OpResult::Auth { auth_revision }) => {
                    prop_assert_eq!(model.revision, *auth_revision, "auth revision after {:?}", cmd);
                    Ok(())
                }
                Err(KvError::Auth(e)) => Err(e.clone()),
                other => panic!("{cmd:?} answered {other:?}"),
            };
            prop_assert_eq!(expected, got, "after {:?}", cmd);
        }
        let judged = judge(&db, &requests);
        let expected: Vec<bool> =
            requests.iter().map(|(u, k, e, t)| model.permitted(u, k, e, *t)).collect();
        for (i, (want, got)) in expected.iter().zip(&judged.0).enumerate() {
            prop_assert_eq!(want, got, "request {:?} of model {:?}", requests[i], model);
        }
        prop_assert_eq!(model.users.keys().cloned().collect::<Vec<_>>(), judged.1.clone());
        prop_assert_eq!((model.enabled, model.revision), (judged.2, judged.3));
        // A snapshot restored elsewhere answers the same.
        let mut snap = Vec::new();
        KvStore::default().snapshot(&db.begin_read().expect("read"), &mut snap).expect("snapshot");
        let db2 = memory_db();
        let txn = db2.begin_write().expect("write txn");
        KvStore::default().restore(&txn, &mut snap.as_slice()).expect("restore");
        txn.commit().expect("commit");
        prop_assert_eq!(judged, judge(&db2, &requests));
    }
}

#[test]
fn a_snapshot_without_auth_tables_restores_with_auth_off() {
    // A snapshot written before auth existed: the KV tables only.
    let db = memory_db();
    let mut snap = Vec::new();
    KvStore::default().snapshot(&db.begin_read().expect("read"), &mut snap).expect("snapshot");
    // Three empty auth tables: a u64 row count of 0 each.
    snap.truncate(snap.len() - 24);
    let db2 = memory_db();
    let txn = db2.begin_write().expect("write txn");
    KvStore::default().restore(&txn, &mut snap.as_slice()).expect("restore");
    txn.commit().expect("commit");
    assert_eq!((vec![], vec![], false, 1), judge(&db2, &[]));
}

#[test]
fn a_token_ends_with_its_ttl_its_password_its_user_or_a_disable() {
    let db = memory_db();
    let apply = |cmds: Vec<AuthCommand>| {
        let txn = db.begin_write().expect("write txn");
        let out =
            KvStore::default().apply(&txn, cmds.into_iter().map(KvCommand::Auth).collect()).expect("apply");
        txn.commit().expect("commit");
        assert!(out.iter().all(|r| r.result.is_ok()), "{out:?}");
    };
    let user = |name: &str| AuthCommand::UserAdd { name: name.into(), password_hash: Some("h".into()) };
    apply(vec![
        user("root"),
        AuthCommand::UserGrantRole { user: "root".into(), role: "root".into() },
        user("alice"),
        AuthCommand::Enable { secret: [1; 32] },
    ]);
    // What Authenticate does once the password checked: bind the token to that password.
    let issue = |expires: u64| {
        let read = db.begin_read().expect("read");
        let view = AuthView::open(&read).expect("view");
        let rev = view.user("alice").expect("user").expect("alice").password_revision;
        view.issue_token("alice", rev, expires).expect("issue").expect("auth is on")
    };
    let check = |token: &str, now: u64| {
        let read = db.begin_read().expect("read");
        AuthView::open(&read).expect("view").check_token(token, now).expect("check").map(|c| c.name)
    };
    let t = issue(100);
    assert_eq!(Ok("alice".to_string()), check(&t, 99));
    assert_eq!(Err(AuthError::InvalidAuthToken), check(&t, 100), "expired");
    assert_eq!(Err(AuthError::InvalidAuthToken), check(&format!("{t}x"), 99), "altered");
    apply(vec![AuthCommand::UserChangePassword { name: "alice".into(), password_hash: "h2".into() }]);
    assert_eq!(Err(AuthError::InvalidAuthToken), check(&t, 99), "after a password change");
    let t = issue(100);
    assert_eq!(Ok("alice".to_string()), check(&t, 99));
    apply(vec![AuthCommand::Disable, AuthCommand::Enable { secret: [2; 32] }]);
    assert_eq!(Err(AuthError::InvalidAuthToken), check(&t, 99), "after auth was disabled and enabled again");
    let t = issue(100);
    apply(vec![AuthCommand::UserDelete { name: "alice".into() }, user("alice")]);
    assert_eq!(Err(AuthError::InvalidAuthToken), check(&t, 99), "after a delete and a new user of that name");
}
