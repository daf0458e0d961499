//! etcd's auth as replicated state: users, roles and their key-range permissions, the enabled
//! flag and the auth revision (in redb tables beside the KV state), how [`AuthCommand`]s change
//! them, the permission check, and the tokens `Authenticate` hands out.
//!
//! Tables:
//! - `auth_users`: user name → [`UserRecord`] (version byte 1, then postcard).
//! - `auth_roles`: role name → [`RoleRecord`] (version byte 1, then postcard).
//! - `auth_meta`: `"enabled"` → `[0|1]`; `"revision"` → u64 LE, the auth revision (1 before any
//!   change, as etcd; every change bumps it); `"enabled_revision"` → u64 LE, the auth revision at
//!   which auth was last enabled; `"secret"` → 32 bytes, the cluster's token key, created by the
//!   first enable and kept from then on.
//!
//! Passwords enter the log only as bcrypt hashes: the node that receives a request hashes it
//! before proposing ([`crate::api::KvApi`]).
//!
//! Tokens are stateless (see [`issue_token`]): any member checks one against its own applied state,
//! with no Raft traffic, and a token stops working when its user's password changes, the user is
//! deleted, auth is disabled, or its TTL runs out.

use std::io;

use keel::redb::ReadTransaction;
use keel::redb::ReadableTable;
use keel::redb::TableDefinition;
use keel::redb::WriteTransaction;
use keel::StateMachineError;
use serde::Deserialize;
use serde::Serialize;

use crate::store::DeleteRange;
use crate::store::KvCommand;
use crate::store::KvError;
use crate::store::Op;
use crate::store::OpResult;
use crate::store::Put;
use crate::store::Txn;

pub(crate) const AUTH_USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("auth_users");
pub(crate) const AUTH_ROLES: TableDefinition<&str, &[u8]> = TableDefinition::new("auth_roles");
pub(crate) const AUTH_META: TableDefinition<&str, &[u8]> = TableDefinition::new("auth_meta");

pub(crate) const ENABLED: &str = "enabled";
pub(crate) const REVISION: &str = "revision";
pub(crate) const ENABLED_REVISION: &str = "enabled_revision";
pub(crate) const SECRET: &str = "secret";
/// The auth revision of a store no auth change has touched (etcd's: it commits revision 1 at start).
const FIRST_REVISION: u64 = 1;
/// The version byte before each user and role record.
const RECORD_VERSION: u8 = 1;

/// etcd's superuser and superrole: a user with the role `root` may do everything; auth can be
/// enabled only once user `root` has it.
pub const ROOT: &str = "root";

/// Bytes of the cluster's token key.
pub const SECRET_BYTES: usize = 32;

// ---------------------------------------------------------------------------------------------
// Commands, records and errors

/// A change to the auth state, proposed through Raft ([`crate::store::KvCommand::Auth`]).
/// Postcard encodes variants by index: append new ones last, never reorder.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthCommand {
    /// Turns auth on. `secret` becomes the token key if the cluster has none yet (it is drawn by
    /// the proposing node; a later enable keeps the first one).
    Enable {
        secret: [u8; SECRET_BYTES],
    },
    Disable,
    /// `password_hash`: bcrypt, or None for a user without a password (`no_password`).
    UserAdd {
        name: String,
        password_hash: Option<String>,
    },
    UserDelete {
        name: String,
    },
    UserChangePassword {
        name: String,
        password_hash: String,
    },
    UserGrantRole {
        user: String,
        role: String,
    },
    UserRevokeRole {
        user: String,
        role: String,
    },
    RoleAdd {
        name: String,
    },
    RoleDelete {
        name: String,
    },
    /// Adds the permission, or changes the type of one on the same key and range end.
    RoleGrantPermission {
        role: String,
        perm: Permission,
    },
    RoleRevokePermission {
        role: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        range_end: Vec<u8>,
    },
}

/// Never prints a secret or a password hash (commands are logged on errors).
impl std::fmt::Debug for AuthCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthCommand::Enable { .. } => write!(f, "Enable"),
            AuthCommand::Disable => write!(f, "Disable"),
            AuthCommand::UserAdd { name, password_hash } => {
                write!(f, "UserAdd({name:?}, password: {})", password_hash.is_some())
            }
            AuthCommand::UserDelete { name } => write!(f, "UserDelete({name:?})"),
            AuthCommand::UserChangePassword { name, .. } => write!(f, "UserChangePassword({name:?})"),
            AuthCommand::UserGrantRole { user, role } => write!(f, "UserGrantRole({user:?}, {role:?})"),
            AuthCommand::UserRevokeRole { user, role } => write!(f, "UserRevokeRole({user:?}, {role:?})"),
            AuthCommand::RoleAdd { name } => write!(f, "RoleAdd({name:?})"),
            AuthCommand::RoleDelete { name } => write!(f, "RoleDelete({name:?})"),
            AuthCommand::RoleGrantPermission { role, perm } => {
                write!(f, "RoleGrantPermission({role:?}, {perm:?})")
            }
            AuthCommand::RoleRevokePermission { role, key, range_end } => {
                write!(f, "RoleRevokePermission({role:?}, {key:?}, {range_end:?})")
            }
        }
    }
}

/// etcd's `Permission.Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PermType {
    Read,
    Write,
    ReadWrite,
}

impl PermType {
    /// Whether a permission of this type allows access of type `need` (Read or Write).
    pub fn allows(self, need: PermType) -> bool {
        self == PermType::ReadWrite || self == need
    }
}

/// Access of one type to `key` (`range_end` empty), every key from `key` on (`range_end` =
/// `[0]`), or the keys `[key, range_end)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permission {
    pub perm_type: PermType,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub range_end: Vec<u8>,
}

/// A user as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// bcrypt hash; None: the user was added with `no_password` and cannot authenticate.
    pub password_hash: Option<String>,
    /// Sorted, without duplicates.
    pub roles: Vec<String>,
    /// The auth revision at which the password was last set (add or change). A token carries it,
    /// so a later change (or a delete and re-add) leaves older tokens invalid.
    pub password_revision: u64,
}

/// A role as stored: its permissions, ordered by key (as etcd keeps them).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleRecord {
    pub perms: Vec<Permission>,
}

/// Why an auth request was refused. Each is one of etcd's errors (`rpctypes`); the message is
/// etcd's without its `etcdserver: ` prefix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum AuthError {
    #[error("root user does not exist")]
    RootUserNotExist,
    #[error("root user does not have root role")]
    RootRoleNotExist,
    #[error("user name already exists")]
    UserAlreadyExist,
    #[error("user name is empty")]
    UserEmpty,
    #[error("user name not found")]
    UserNotFound,
    #[error("role name already exists")]
    RoleAlreadyExist,
    #[error("role name not found")]
    RoleNotFound,
    #[error("role name is empty")]
    RoleEmpty,
    #[error("authentication failed, invalid user ID or password")]
    AuthFailed,
    #[error("permission denied")]
    PermissionDenied,
    #[error("role is not granted to the user")]
    RoleNotGranted,
    #[error("permission is not granted to the role")]
    PermissionNotGranted,
    #[error("authentication is not enabled")]
    AuthNotEnabled,
    #[error("invalid auth token")]
    InvalidAuthToken,
    /// Deleting user or role `root`, or revoking role `root` from user `root`, while auth is on.
    #[error("invalid auth management")]
    InvalidAuthMgmt,
}

fn corrupt(what: String) -> StateMachineError {
    StateMachineError::Io(io::Error::new(io::ErrorKind::InvalidData, what))
}

pub(crate) fn encode_record<T: Serialize>(record: &T) -> Vec<u8> {
    let mut out = vec![RECORD_VERSION];
    // Serializing plain structs of strings, bytes and integers into a Vec cannot fail.
    out.extend(postcard::to_allocvec(record).expect("auth records always serialize"));
    out
}

pub(crate) fn decode_record<T: for<'de> Deserialize<'de>>(
    table: &str,
    name: &str,
    bytes: &[u8],
) -> Result<T, StateMachineError> {
    match bytes.split_first() {
        Some((&RECORD_VERSION, rest)) => postcard::from_bytes(rest)
            .map_err(|e| corrupt(format!("{table} row {name:?} does not decode: {e}"))),
        _ => Err(corrupt(format!("{table} row {name:?} has an unknown version"))),
    }
}

// ---------------------------------------------------------------------------------------------
// Permission check: the union of intervals

/// One end of a key interval: a key, or past every key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum End {
    Key(Vec<u8>),
    Infinity,
}

/// The half-open interval `[key, end)` that `key` and `range_end` mean to etcd: one key is
/// `[key, key + "\0")`, `range_end` "\0" is every key from `key` on.
fn interval(key: &[u8], range_end: &[u8]) -> (Vec<u8>, End) {
    match range_end {
        [] => {
            let mut next = key.to_vec();
            next.push(0);
            (key.to_vec(), End::Key(next))
        }
        [0] => (key.to_vec(), End::Infinity),
        end => (key.to_vec(), End::Key(end.to_vec())),
    }
}

/// Whether the union of `granted` (`(key, range_end)` pairs) covers every key a request for
/// `[key, range_end)` may touch. A request whose `range_end` is at or before `key` selects no
/// keys; it is judged as a request for `key` alone (never more permissive than that).
pub fn covers<'a>(
    granted: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    key: &[u8],
    range_end: &[u8],
) -> bool {
    let (start, mut end) = interval(key, range_end);
    if matches!(&end, End::Key(e) if e.as_slice() <= start.as_slice()) {
        end = interval(key, &[]).1;
    }
    let mut intervals: Vec<(Vec<u8>, End)> = granted
        .into_iter()
        .map(|(k, e)| interval(k, e))
        .filter(|(s, e)| match e {
            End::Key(e) => s < e,
            End::Infinity => true,
        })
        .collect();
    intervals.sort();
    // Sweep: `covered` is the end of the prefix of the request known to be covered.
    let mut covered = End::Key(start);
    for (s, e) in intervals {
        if covered >= end {
            break;
        }
        if End::Key(s) > covered {
            break;
        }
        if e > covered {
            covered = e;
        }
    }
    covered >= end
}

/// Whether `user` may access `[key, range_end)` with `need` (Read or Write), given its roles'
/// records: role `root` may do everything; otherwise the user's permissions of that type, from
/// every role, must cover the range ([`covers`]).
pub fn permitted(
    user: &UserRecord,
    roles: &[RoleRecord],
    key: &[u8],
    range_end: &[u8],
    need: PermType,
) -> bool {
    if user.roles.iter().any(|r| r == ROOT) {
        return true;
    }
    let granted = roles
        .iter()
        .flat_map(|r| r.perms.iter())
        .filter(|p| p.perm_type.allows(need))
        .map(|p| (p.key.as_slice(), p.range_end.as_slice()));
    covers(granted, key, range_end)
}

/// Who sent a request, as the member that received it found out: the user, and — when a token
/// named it — the password revision the token is bound to, which every later judgement checks
/// again (a password changed since, on a member that had not applied the change yet when it read
/// the token, still ends the token at once).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    pub name: String,
    pub password_revision: Option<u64>,
}

impl Caller {
    /// A user named without a token (a TLS client certificate, HTTP basic credentials).
    pub fn named(name: impl Into<String>) -> Self {
        Caller { name: name.into(), password_revision: None }
    }
}

/// One access a request makes: `need` (Read or Write) on `[key, range_end)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
    pub need: PermType,
}

impl Access {
    pub fn new(key: &[u8], range_end: &[u8], need: PermType) -> Self {
        Access { key: key.to_vec(), range_end: range_end.to_vec(), need }
    }
}

/// What a command needs of the user who sent it, as etcd's auth applier asks: key accesses, or
/// role `root` (auth changes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Need {
    Keys(Vec<Access>),
    Root,
}

/// The accesses `cmd` makes (etcd's `authApplierV3`): a put writes its key (and reads it with
/// `prev_kv`), and may attach its key to a lease only if the user may write every key already on
/// it; a delete writes its range (and reads it with `prev_kv`); a txn reads every compared range and
/// needs every op of both branches, nested txns included, whichever branch runs; a lease revoke
/// writes every key on the lease. `lease_keys(id)` answers the keys attached to lease `id`.
pub fn needs(cmd: &KvCommand, lease_keys: &mut dyn FnMut(i64) -> Vec<Vec<u8>>) -> Need {
    let mut out = Vec::new();
    match cmd {
        KvCommand::Put(p) => {
            put_needs(p, &mut out);
            if p.lease != 0 {
                out.extend(lease_keys(p.lease).iter().map(|k| Access::new(k, &[], PermType::Write)));
            }
        }
        KvCommand::DeleteRange(d) => delete_needs(d, &mut out),
        KvCommand::Txn(t) => txn_needs(t, &mut out),
        KvCommand::LeaseRevoke { id } => {
            out.extend(lease_keys(*id).iter().map(|k| Access::new(k, &[], PermType::Write)))
        }
        KvCommand::Auth(_) => return Need::Root,
        // Granting a lease and compacting need no permission in etcd 3.4; member ids and alarms
        // are judged by the API that proposes them (Cluster, Maintenance).
        KvCommand::LeaseGrant { .. }
        | KvCommand::Compact { .. }
        | KvCommand::AllocateMemberId { .. }
        | KvCommand::Alarm(_) => {}
        KvCommand::AsUser { cmd, .. } => return needs(cmd, lease_keys),
    }
    Need::Keys(out)
}

fn put_needs(p: &Put, out: &mut Vec<Access>) {
    out.push(Access::new(&p.key, &[], PermType::Write));
    if p.prev_kv {
        out.push(Access::new(&p.key, &[], PermType::Read));
    }
}

fn delete_needs(d: &DeleteRange, out: &mut Vec<Access>) {
    out.push(Access::new(&d.key, &d.range_end, PermType::Write));
    if d.prev_kv {
        out.push(Access::new(&d.key, &d.range_end, PermType::Read));
    }
}

fn txn_needs(t: &Txn, out: &mut Vec<Access>) {
    for c in &t.compare {
        out.push(Access::new(&c.key, &c.range_end, PermType::Read));
    }
    for op in t.success.iter().chain(&t.failure) {
        match op {
            Op::Range(r) => out.push(Access::new(&r.key, &r.range_end, PermType::Read)),
            Op::Put(p) => put_needs(p, out),
            Op::DeleteRange(d) => delete_needs(d, out),
            Op::Txn(inner) => txn_needs(inner, out),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the state

/// The tables of the auth state in one transaction (absent tables read as empty): a read
/// transaction's, or the applying write transaction's ([`AuthView::in_write`]).
pub struct AuthView<T = keel::redb::ReadOnlyTable<&'static str, &'static [u8]>> {
    users: Option<T>,
    roles: Option<T>,
    meta: Option<T>,
}

fn open_ro<K: keel::redb::Key + 'static, V: keel::redb::Value + 'static>(
    txn: &ReadTransaction,
    def: TableDefinition<K, V>,
) -> Result<Option<keel::redb::ReadOnlyTable<K, V>>, StateMachineError> {
    match txn.open_table(def) {
        Ok(t) => Ok(Some(t)),
        Err(keel::redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// What auth looks like in one read: on or off, and its revision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuthStatus {
    pub enabled: bool,
    pub revision: u64,
}

impl AuthView {
    pub fn open(txn: &ReadTransaction) -> Result<Self, StateMachineError> {
        Ok(Self {
            users: open_ro(txn, AUTH_USERS)?,
            roles: open_ro(txn, AUTH_ROLES)?,
            meta: open_ro(txn, AUTH_META)?,
        })
    }
}

impl<'t> AuthView<keel::redb::Table<'t, &'static str, &'static [u8]>> {
    /// The auth state as the applying transaction has it (the tables are created if absent).
    pub(crate) fn in_write(txn: &'t WriteTransaction) -> Result<Self, StateMachineError> {
        Ok(Self {
            users: Some(txn.open_table(AUTH_USERS)?),
            roles: Some(txn.open_table(AUTH_ROLES)?),
            meta: Some(txn.open_table(AUTH_META)?),
        })
    }
}

impl<T: ReadableTable<&'static str, &'static [u8]>> AuthView<T> {
    pub fn status(&self) -> Result<AuthStatus, StateMachineError> {
        let Some(meta) = &self.meta else {
            return Ok(AuthStatus { enabled: false, revision: FIRST_REVISION });
        };
        let enabled = meta.get(ENABLED)?.is_some_and(|v| v.value() == [1]);
        let revision = match meta.get(REVISION)? {
            Some(v) => parse_u64(REVISION, v.value())?,
            None => FIRST_REVISION,
        };
        Ok(AuthStatus { enabled, revision })
    }

    fn meta_u64(&self, key: &str) -> Result<u64, StateMachineError> {
        match self.meta.as_ref().map(|m| m.get(key)).transpose()?.flatten() {
            Some(v) => parse_u64(key, v.value()),
            None => Ok(0),
        }
    }

    pub fn user(&self, name: &str) -> Result<Option<UserRecord>, StateMachineError> {
        match self.users.as_ref().map(|t| t.get(name)).transpose()?.flatten() {
            Some(v) => Ok(Some(decode_record("auth_users", name, v.value())?)),
            None => Ok(None),
        }
    }

    pub fn role(&self, name: &str) -> Result<Option<RoleRecord>, StateMachineError> {
        match self.roles.as_ref().map(|t| t.get(name)).transpose()?.flatten() {
            Some(v) => Ok(Some(decode_record("auth_roles", name, v.value())?)),
            None => Ok(None),
        }
    }

    /// Every user name, sorted.
    pub fn user_names(&self) -> Result<Vec<String>, StateMachineError> {
        names(self.users.as_ref())
    }

    /// Every role name, sorted.
    pub fn role_names(&self) -> Result<Vec<String>, StateMachineError> {
        names(self.roles.as_ref())
    }

    /// Whether user `name` may access `[key, range_end)` with `need`: etcd's check, on this
    /// state. An unknown user may do nothing.
    pub fn permitted(
        &self,
        name: &str,
        key: &[u8],
        range_end: &[u8],
        need: PermType,
    ) -> Result<bool, StateMachineError> {
        let Some(user) = self.user(name)? else { return Ok(false) };
        let roles = self.roles_of(&user)?;
        Ok(permitted(&user, &roles, key, range_end, need))
    }

    /// The records of `user`'s roles (a role deleted meanwhile is skipped, as etcd does).
    fn roles_of(&self, user: &UserRecord) -> Result<Vec<RoleRecord>, StateMachineError> {
        let mut roles = Vec::with_capacity(user.roles.len());
        for r in &user.roles {
            if let Some(role) = self.role(r)? {
                roles.push(role);
            }
        }
        Ok(roles)
    }

    /// Why `caller` (None: a request without credentials) may not do what `need` says, if it
    /// may not: etcd's answers — no user "user name is empty", a token whose password has changed
    /// since "invalid auth token", an unknown user for an auth change "user name not found", else
    /// "permission denied". Always allowed while auth is off.
    pub fn refusal(
        &self,
        caller: Option<&Caller>,
        need: &Need,
    ) -> Result<Option<AuthError>, StateMachineError> {
        if !self.status()?.enabled {
            return Ok(None);
        }
        let Some(caller) = caller else { return Ok(Some(AuthError::UserEmpty)) };
        let user = self.user(&caller.name)?;
        if caller.password_revision.is_some()
            && user.as_ref().map(|u| u.password_revision) != caller.password_revision
        {
            return Ok(Some(AuthError::InvalidAuthToken));
        }
        let Some(user) = user else {
            return Ok(Some(match need {
                Need::Root => AuthError::UserNotFound,
                Need::Keys(_) => AuthError::PermissionDenied,
            }));
        };
        if user.roles.iter().any(|r| r == ROOT) {
            return Ok(None);
        }
        let Need::Keys(accesses) = need else { return Ok(Some(AuthError::PermissionDenied)) };
        let roles = self.roles_of(&user)?;
        let denied = accesses.iter().any(|a| !permitted(&user, &roles, &a.key, &a.range_end, a.need));
        Ok(denied.then_some(AuthError::PermissionDenied))
    }

    /// The user a token names, if it is valid now (`now`: seconds since the Unix epoch): issued
    /// with this cluster's key, not expired, auth still on since it was issued, and the user's
    /// password unchanged since.
    pub fn check_token(&self, token: &str, now: u64) -> Result<Result<Caller, AuthError>, StateMachineError> {
        let status = self.status()?;
        let Some(secret) = self.secret()? else { return Ok(Err(AuthError::InvalidAuthToken)) };
        let Some(claims) = verify_token(&secret, token) else { return Ok(Err(AuthError::InvalidAuthToken)) };
        let current = status.enabled
            && claims.expires > now
            && claims.enabled_revision == self.meta_u64(ENABLED_REVISION)?
            && self.user(&claims.user)?.is_some_and(|u| u.password_revision == claims.password_revision);
        Ok(if current {
            Ok(Caller { name: claims.user, password_revision: Some(claims.password_revision) })
        } else {
            Err(AuthError::InvalidAuthToken)
        })
    }

    /// A token for user `name` valid until `expires` (seconds since the Unix epoch), bound to the
    /// password set at `password_revision` (the one the caller checked) and to this enable of
    /// auth. None if auth is off.
    pub fn issue_token(
        &self,
        name: &str,
        password_revision: u64,
        expires: u64,
    ) -> Result<Option<String>, StateMachineError> {
        if !self.status()?.enabled {
            return Ok(None);
        }
        let Some(secret) = self.secret()? else { return Ok(None) };
        let claims = TokenClaims {
            user: name.to_string(),
            password_revision,
            enabled_revision: self.meta_u64(ENABLED_REVISION)?,
            expires,
        };
        Ok(Some(issue_token(&secret, &claims)))
    }

    fn secret(&self) -> Result<Option<Vec<u8>>, StateMachineError> {
        Ok(self.meta.as_ref().map(|m| m.get(SECRET)).transpose()?.flatten().map(|v| v.value().to_vec()))
    }
}

fn names<T: ReadableTable<&'static str, &'static [u8]>>(
    table: Option<&T>,
) -> Result<Vec<String>, StateMachineError> {
    let mut out = Vec::new();
    if let Some(t) = table {
        for row in t.iter()? {
            out.push(row?.0.value().to_string());
        }
    }
    Ok(out)
}

fn parse_u64(key: &str, bytes: &[u8]) -> Result<u64, StateMachineError> {
    bytes
        .try_into()
        .map(u64::from_le_bytes)
        .map_err(|_| corrupt(format!("auth_meta row {key:?} of {} bytes", bytes.len())))
}

// ---------------------------------------------------------------------------------------------
// Tokens

/// What a token says: whose it is, which password and which enable of auth it belongs to, and
/// until when it is good.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenClaims {
    pub user: String,
    pub password_revision: u64,
    pub enabled_revision: u64,
    /// Seconds since the Unix epoch.
    pub expires: u64,
}

/// `<user, base64url>.<password revision>.<enabled revision>.<expiry>.<HMAC-SHA256 of the rest
/// under the cluster key, base64url>`: printable ASCII, so it fits gRPC metadata and HTTP headers.
pub fn issue_token(secret: &[u8], c: &TokenClaims) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let body =
        format!("{}.{}.{}.{}", b64.encode(&c.user), c.password_revision, c.enabled_revision, c.expires);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let tag = ring::hmac::sign(&key, body.as_bytes());
    format!("{body}.{}", b64.encode(tag.as_ref()))
}

/// The claims of a token made by [`issue_token`] with `secret`; None if it was not (forged,
/// altered, or not a token at all). Says nothing of whether the claims still hold.
pub fn verify_token(secret: &[u8], token: &str) -> Option<TokenClaims> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let (body, tag) = token.rsplit_once('.')?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    ring::hmac::verify(&key, body.as_bytes(), &b64.decode(tag).ok()?).ok()?;
    let mut parts = body.split('.');
    let user = String::from_utf8(b64.decode(parts.next()?).ok()?).ok()?;
    let password_revision = parts.next()?.parse().ok()?;
    let enabled_revision = parts.next()?.parse().ok()?;
    let expires = parts.next()?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some(TokenClaims { user, password_revision, enabled_revision, expires })
}

// ---------------------------------------------------------------------------------------------
// Applying changes

type Applied = Result<Result<OpResult, KvError>, StateMachineError>;

/// Applies one auth change in `txn`: etcd's rules and errors; a refused change changes nothing,
/// every other bumps the auth revision. Answers [`OpResult::Auth`] with the auth revision after it.
pub(crate) fn apply(txn: &WriteTransaction, cmd: AuthCommand) -> Applied {
    let mut users = txn.open_table(AUTH_USERS)?;
    let mut roles = txn.open_table(AUTH_ROLES)?;
    let mut meta = txn.open_table(AUTH_META)?;
    let enabled = meta.get(ENABLED)?.is_some_and(|v| v.value() == [1]);
    let revision = match meta.get(REVISION)? {
        Some(v) => parse_u64(REVISION, v.value())?,
        None => FIRST_REVISION,
    };
    let next = revision + 1;
    let get_user = |users: &keel::redb::Table<'_, &'static str, &'static [u8]>,
                    name: &str|
     -> Result<Option<UserRecord>, StateMachineError> {
        match users.get(name)? {
            Some(v) => Ok(Some(decode_record("auth_users", name, v.value())?)),
            None => Ok(None),
        }
    };
    let get_role = |roles: &keel::redb::Table<'_, &'static str, &'static [u8]>,
                    name: &str|
     -> Result<Option<RoleRecord>, StateMachineError> {
        match roles.get(name)? {
            Some(v) => Ok(Some(decode_record("auth_roles", name, v.value())?)),
            None => Ok(None),
        }
    };
    let refused = |e: AuthError| -> Applied { Ok(Err(KvError::Auth(e))) };
    match cmd {
        AuthCommand::Enable { secret } => {
            // etcd: enabling when on is a no-op that succeeds.
            if enabled {
                return Ok(Ok(OpResult::Auth { auth_revision: revision }));
            }
            let Some(root) = get_user(&users, ROOT)? else { return refused(AuthError::RootUserNotExist) };
            if !root.roles.iter().any(|r| r == ROOT) {
                return refused(AuthError::RootRoleNotExist);
            }
            meta.insert(ENABLED, [1u8].as_slice())?;
            meta.insert(ENABLED_REVISION, next.to_le_bytes().as_slice())?;
            if meta.get(SECRET)?.is_none() {
                meta.insert(SECRET, secret.as_slice())?;
            }
        }
        AuthCommand::Disable => {
            if !enabled {
                return Ok(Ok(OpResult::Auth { auth_revision: revision }));
            }
            meta.insert(ENABLED, [0u8].as_slice())?;
        }
        AuthCommand::UserAdd { name, password_hash } => {
            if name.is_empty() {
                return refused(AuthError::UserEmpty);
            }
            if get_user(&users, &name)?.is_some() {
                return refused(AuthError::UserAlreadyExist);
            }
            let user = UserRecord { password_hash, roles: Vec::new(), password_revision: next };
            users.insert(name.as_str(), encode_record(&user).as_slice())?;
        }
        AuthCommand::UserDelete { name } => {
            if enabled && name == ROOT {
                return refused(AuthError::InvalidAuthMgmt);
            }
            if users.remove(name.as_str())?.is_none() {
                return refused(AuthError::UserNotFound);
            }
        }
        AuthCommand::UserChangePassword { name, password_hash } => {
            let Some(mut user) = get_user(&users, &name)? else { return refused(AuthError::UserNotFound) };
            user.password_hash = Some(password_hash);
            user.password_revision = next;
            users.insert(name.as_str(), encode_record(&user).as_slice())?;
        }
        AuthCommand::UserGrantRole { user: name, role } => {
            let Some(mut user) = get_user(&users, &name)? else { return refused(AuthError::UserNotFound) };
            // etcd: role `root` may be granted whether or not a role of that name was added.
            if role != ROOT && get_role(&roles, &role)?.is_none() {
                return refused(AuthError::RoleNotFound);
            }
            match user.roles.binary_search(&role) {
                // Already granted: etcd answers success and changes nothing.
                Ok(_) => return Ok(Ok(OpResult::Auth { auth_revision: revision })),
                Err(at) => user.roles.insert(at, role),
            }
            users.insert(name.as_str(), encode_record(&user).as_slice())?;
        }
        AuthCommand::UserRevokeRole { user: name, role } => {
            if enabled && name == ROOT && role == ROOT {
                return refused(AuthError::InvalidAuthMgmt);
            }
            let Some(mut user) = get_user(&users, &name)? else { return refused(AuthError::UserNotFound) };
            let Ok(at) = user.roles.binary_search(&role) else { return refused(AuthError::RoleNotGranted) };
            user.roles.remove(at);
            users.insert(name.as_str(), encode_record(&user).as_slice())?;
        }
        AuthCommand::RoleAdd { name } => {
            if name.is_empty() {
                return refused(AuthError::RoleEmpty);
            }
            if get_role(&roles, &name)?.is_some() {
                return refused(AuthError::RoleAlreadyExist);
            }
            roles.insert(name.as_str(), encode_record(&RoleRecord::default()).as_slice())?;
        }
        AuthCommand::RoleDelete { name } => {
            if enabled && name == ROOT {
                return refused(AuthError::InvalidAuthMgmt);
            }
            if roles.remove(name.as_str())?.is_none() {
                return refused(AuthError::RoleNotFound);
            }
            // etcd: the role is revoked from every user that had it.
            let mut holders = Vec::new();
            for row in users.iter()? {
                let (k, v) = row?;
                let user: UserRecord = decode_record("auth_users", k.value(), v.value())?;
                if user.roles.contains(&name) {
                    holders.push((k.value().to_string(), user));
                }
            }
            for (user_name, mut user) in holders {
                user.roles.retain(|r| *r != name);
                users.insert(user_name.as_str(), encode_record(&user).as_slice())?;
            }
        }
        AuthCommand::RoleGrantPermission { role: name, perm } => {
            let Some(mut role) = get_role(&roles, &name)? else { return refused(AuthError::RoleNotFound) };
            match role.perms.iter_mut().find(|p| p.key == perm.key && p.range_end == perm.range_end) {
                Some(p) => p.perm_type = perm.perm_type,
                None => {
                    // Kept ordered by key; among equal keys, in the order granted.
                    let at = role.perms.partition_point(|p| p.key <= perm.key);
                    role.perms.insert(at, perm);
                }
            }
            roles.insert(name.as_str(), encode_record(&role).as_slice())?;
        }
        AuthCommand::RoleRevokePermission { role: name, key, range_end } => {
            let Some(mut role) = get_role(&roles, &name)? else { return refused(AuthError::RoleNotFound) };
            let before = role.perms.len();
            role.perms.retain(|p| p.key != key || p.range_end != range_end);
            if role.perms.len() == before {
                return refused(AuthError::PermissionNotGranted);
            }
            roles.insert(name.as_str(), encode_record(&role).as_slice())?;
        }
    }
    meta.insert(REVISION, next.to_le_bytes().as_slice())?;
    Ok(Ok(OpResult::Auth { auth_revision: next }))
}

// ---------------------------------------------------------------------------------------------
// Snapshots

/// Writes the auth tables after the KV state's (see `docs/formats.md`).
pub(crate) fn dump(txn: &ReadTransaction, out: &mut dyn io::Write) -> Result<(), StateMachineError> {
    keel::dump_table(txn, AUTH_META, out)?;
    keel::dump_table(txn, AUTH_USERS, out)?;
    keel::dump_table(txn, AUTH_ROLES, out)
}

/// Reads what [`dump`] wrote. A snapshot from before auth existed ends where the auth tables
/// would start: then the tables stay empty (auth off).
pub(crate) fn load(txn: &WriteTransaction, input: &mut dyn io::Read) -> Result<(), StateMachineError> {
    let mut first = [0u8; 8];
    let mut got = 0;
    while got < first.len() {
        match input.read(&mut first[got..]) {
            Ok(0) if got == 0 => return Ok(()),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut chained = io::Read::chain(&first[..], input);
    keel::load_table(txn, AUTH_META, &mut chained)?;
    keel::load_table(txn, AUTH_USERS, &mut chained)?;
    keel::load_table(txn, AUTH_ROLES, &mut chained)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Iterator<Item = (&'a [u8], &'a [u8])> {
        pairs.iter().map(|(k, e)| (k.as_bytes(), e.as_bytes()))
    }

    #[test]
    fn a_point_permission_covers_only_its_key() {
        assert!(covers(g(&[("a", "")]), b"a", b""));
        assert!(!covers(g(&[("a", "")]), b"ab", b""));
        assert!(!covers(g(&[("a", "")]), b"a", b"b"));
    }

    #[test]
    fn adjacent_ranges_cover_their_union_and_a_gap_does_not() {
        assert!(covers(g(&[("a", "c"), ("c", "e")]), b"b", b"d"));
        assert!(!covers(g(&[("a", "c"), ("d", "e")]), b"b", b"d"));
        assert!(covers(g(&[("a", "\0")]), b"zz", b"\0"));
        assert!(!covers(g(&[("b", "\0")]), b"a", b"\0"));
        assert!(!covers(g(&[("a", "z")]), b"a", b"\0"));
    }

    #[test]
    fn tokens_round_trip_and_an_altered_one_is_refused() {
        let c = TokenClaims { user: "al.ice".into(), password_revision: 7, enabled_revision: 3, expires: 99 };
        let t = issue_token(b"k", &c);
        assert_eq!(Some(c), verify_token(b"k", &t));
        assert_eq!(None, verify_token(b"other", &t));
        let forged = t.replacen(".7.", ".8.", 1);
        assert_eq!(None, verify_token(b"k", &forged));
        assert_eq!(None, verify_token(b"k", "garbage"));
    }
}
