//! `keel lock NAME [-- COMMAND…]`: holds a lock of the cluster (`/v1/lock/…`) under a lease kept
//! alive meanwhile, and runs a command while it holds it.
//!
//! Contract: the command runs only while the lease is certainly alive (`session.rs`): when the
//! cluster says the lease is gone, or no keep-alive was acknowledged for a whole TTL, the command
//! gets SIGTERM (SIGKILL after [`KILL_GRACE`]) and `keel lock` exits 1. If `keel lock` itself
//! dies, however it dies (SIGKILL included), the kernel sends the command SIGTERM (Linux: the
//! command runs through `keel run-tied`, which sets the parent-death signal and then becomes it).
//! The lock still cannot stop a command that is slow to die from overlapping the next holder by
//! that much: writes that must never overlap should be fenced by `KEEL_LOCK_REVISION`.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::{self, Write as _};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::process::{ExitCode, ExitStatus, Stdio};
use std::time::Duration;

use clap::Args;
use serde_json::Value;

use crate::client::{
    kv_path, put_bytes_field, ApiRequest, Client, ClientError, DecodeError, LockAnswer, WireKv,
};
use crate::lease::LeaseId;
use crate::session::{self, Lost, QueueError, Session, Signals, Stop};
use crate::{key_bytes, CliError};

/// After SIGTERM, a command that has not exited in this long gets SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(10);
/// The TTL of the lock's lease unless `--ttl` says otherwise (etcdctl's default).
const DEFAULT_TTL: i64 = 10;

/// `keel lock` flags.
#[derive(Args, Debug)]
pub struct LockArgs {
    /// The lock's name (its holders' keys are `NAME/<lease id in hex>`).
    pub name: OsString,
    /// Seconds the lock outlives this process if it dies without releasing it (the TTL of the
    /// lease it is held under).
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_TTL, value_parser = clap::value_parser!(i64).range(1..))]
    pub ttl: i64,
    /// The command to run while holding the lock (after `--` if it has flags of its own);
    /// without one, hold the lock until SIGINT or SIGTERM.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// How a command that had to be stopped was stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// It exited after SIGTERM.
    Terminated,
    /// It was still running [`KILL_GRACE`] after SIGTERM: SIGKILL.
    Killed,
}

/// The lock was lost while held: its lease is gone or can no longer be counted on.
#[derive(Debug)]
pub struct LockLost {
    pub lease: LeaseId,
    pub why: Lost,
    /// How the command was stopped, if one was running.
    pub command: Option<Stopped>,
}

impl fmt::Display for LockLost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "lock lost: lease {}: {}", self.lease, self.why)?;
        match self.command {
            Some(Stopped::Terminated) => f.write_str("; the command was stopped with SIGTERM"),
            Some(Stopped::Killed) => write!(
                f,
                "; the command did not exit within {}s of SIGTERM and was killed",
                KILL_GRACE.as_secs()
            ),
            None => Ok(()),
        }
    }
}

/// What the lock is held as: its key, and the key's create revision (the fencing token: it grows
/// with every new holder, and a write guarded by `create_revision(KEY) == token` succeeds only
/// while this holder's key exists).
struct Held {
    key: Vec<u8>,
    token: i64,
    /// The acquire answer, for `--json`.
    answer: Value,
}

/// `keel lock`.
pub async fn run(client: &Client, json: bool, args: LockArgs) -> Result<String, CliError> {
    let name = key_bytes(args.name)?;
    let mut signals = Signals::catch().map_err(CliError::Signals)?;
    let (mut session, answer) = session::queue(client, &mut signals, args.ttl, "lock", |lease| {
        let mut body = serde_json::Map::new();
        put_bytes_field(&mut body, "name", &name);
        body.insert("lease".into(), lease.0.into());
        ApiRequest::post_json("/v1/lock/acquire".into(), &Value::Object(body))
    })
    .await
    .map_err(|e| CliError::Queue("lock", Box::new(e)))?;
    let key = answer.decode::<LockAnswer>()?.key(&answer.endpoint)?;
    let held = match fencing_token(client, &key).await {
        Ok(Some(token)) => Held { key, token, answer: answer.body },
        Ok(None) => {
            // Gone between the answer and this read: only the lease's end deletes it.
            let lease = session.lease;
            let _ = session.end(client).await;
            return Err(CliError::LockLost(LockLost { lease, why: Lost::Gone, command: None }));
        }
        Err(e) => {
            let _ = session.end(client).await;
            return Err(e.into());
        }
    };

    if args.command.is_empty() {
        let mut shown = held.answer.clone();
        if let Some(obj) = shown.as_object_mut() {
            obj.insert("create_revision".into(), held.token.into());
            obj.insert("lease".into(), session.lease.0.into());
        }
        let line =
            if json { format!("{shown}\n") } else { format!("{}\n", crate::output::show_bytes(&held.key)) };
        print_now(&line)?;
        let lost = tokio::select! {
            _ = signals.recv() => None,
            lost = session.lost() => Some(lost),
        };
        if let Some(why) = lost {
            return Err(CliError::LockLost(LockLost { lease: session.lease, why, command: None }));
        }
        release(client, &held.key, session).await;
        return Ok(String::new());
    }

    let mut child = match spawn_tied(&args.command, &held) {
        Ok(child) => child,
        Err(e) => {
            // Nothing runs: give the lock back now rather than when the lease expires.
            release(client, &held.key, session).await;
            return Err(CliError::Spawn(e));
        }
    };
    let status = loop {
        tokio::select! {
            status = child.wait() => match status {
                Ok(status) => break status,
                Err(e) => {
                    // The command's fate is unknown: stop it before the lock is given back.
                    stop_child(&mut child).await;
                    release(client, &held.key, session).await;
                    return Err(CliError::Spawn(e));
                }
            },
            stop = signals.recv() => {
                // Ctrl+C at a terminal reaches the command too; SIGTERM came to keel alone.
                if stop == Stop::Terminate {
                    signal_child(&child, nix::sys::signal::Signal::SIGTERM);
                }
            }
            why = session.lost() => {
                let stopped = stop_child(&mut child).await;
                return Err(CliError::LockLost(LockLost { lease: session.lease, why, command: Some(stopped) }));
            }
        }
    };
    release(client, &held.key, session).await;
    match exit_code(status) {
        0 => Ok(String::new()),
        code => Err(CliError::CommandExit(code)),
    }
}

/// The create revision of the holder's key, read back (linearizable) after the acquire: the
/// acquire's own revision is when the lock was found free, not when the key was made. `None` if
/// the key is gone.
async fn fencing_token(client: &Client, key: &[u8]) -> Result<Option<i64>, ClientError> {
    match client.call(&ApiRequest::get(kv_path(key))).await {
        Ok(answer) => match answer.decode::<WireKv>()?.create_revision {
            Some(token) => Ok(Some(token)),
            None => Err(ClientError::BadAnswer {
                endpoint: answer.endpoint,
                reason: DecodeError::NoNumber("create_revision"),
            }),
        },
        Err(e) if e.code() == Some("key_not_found") => Ok(None),
        Err(e) => Err(e),
    }
}

/// Releases the lock (deletes the holder's key) and revokes its lease; a failure is reported on
/// stderr only, since the lease's expiry releases the lock anyway.
async fn release(client: &Client, key: &[u8], session: Session) {
    let mut body = serde_json::Map::new();
    put_bytes_field(&mut body, "key", key);
    let request = ApiRequest::post_json("/v1/lock/release".into(), &Value::Object(body)).repeatable();
    let (lease, ttl) = (session.lease, session.ttl);
    let released = client.call(&request).await;
    let revoked = session.end(client).await;
    if let Err(e) = released.map(drop).and(revoked) {
        eprintln!(
            "keel lock: could not release the lock ({e}); it is released when lease {lease} expires, within {}s",
            ttl.as_secs()
        );
    }
}

/// Writes and flushes at once: what a command that holds something prints must show before it
/// waits.
pub fn print_now(text: &str) -> Result<(), CliError> {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        // Nobody reads: holding goes on regardless.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(ClientError::Output(e).into()),
        Ok(()) => Ok(()),
    }
}

/// Starts `command` with the lock's environment, through `keel run-tied` so that it dies with
/// this process. The spawn happens on the calling thread, which lives as long as the process
/// (the runtime is single-threaded): the parent-death signal follows the thread that forked.
fn spawn_tied(command: &[OsString], held: &Held) -> io::Result<tokio::process::Child> {
    // /proc/self/exe is this very binary, even if the file was replaced since it started.
    let me = if cfg!(target_os = "linux") { "/proc/self/exe".into() } else { std::env::current_exe()? };
    tokio::process::Command::new(me)
        .arg("run-tied")
        .arg(std::process::id().to_string())
        .arg("--")
        .args(command)
        .env("KEEL_LOCK_KEY", OsStr::from_bytes(&held.key))
        .env("KEEL_LOCK_REVISION", held.token.to_string())
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
}

fn signal_child(child: &tokio::process::Child, signal: nix::sys::signal::Signal) {
    if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
        // Fails only if it has exited already, which is what was asked for.
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
    }
}

/// SIGTERM, then SIGKILL if it has not exited within [`KILL_GRACE`].
async fn stop_child(child: &mut tokio::process::Child) -> Stopped {
    signal_child(child, nix::sys::signal::Signal::SIGTERM);
    match tokio::time::timeout(KILL_GRACE, child.wait()).await {
        Ok(_) => Stopped::Terminated,
        Err(_) => {
            let _ = child.kill().await;
            Stopped::Killed
        }
    }
}

/// The exit code that reports `status`: the command's own, or 128 + the signal that ended it,
/// as shells report it.
pub fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(1),
        (None, Some(signal)) => u8::try_from(128 + (signal & 0x7f)).unwrap_or(1),
        (None, None) => 1,
    }
}

/// `keel run-tied PARENT -- COMMAND…` (hidden; `keel lock` runs it): asks the kernel to send
/// this process SIGTERM when its parent dies, checks that the parent is still `parent` (it may
/// have died before), then becomes COMMAND (exec), which keeps that setting.
pub fn run_tied(parent: u32, command: &[OsString]) -> ExitCode {
    #[cfg(target_os = "linux")]
    if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM) {
        let _ = writeln!(io::stderr(), "keel lock: cannot tie the command to keel's life: {e}");
        return ExitCode::from(126);
    }
    if std::os::unix::process::parent_id() != parent {
        let _ = writeln!(io::stderr(), "keel lock: exited before the command could start");
        return ExitCode::from(1);
    }
    let Some((program, args)) = command.split_first() else {
        return ExitCode::from(2);
    };
    let e = std::os::unix::process::CommandExt::exec(std::process::Command::new(program).args(args));
    let _ = writeln!(io::stderr(), "keel lock: cannot run {}: {e}", program.to_string_lossy());
    // A shell's codes: 127 not found, 126 found but not runnable.
    ExitCode::from(if e.kind() == io::ErrorKind::NotFound { 127 } else { 126 })
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueError::Client(e) => write!(f, "{e}"),
            QueueError::Interrupted => f.write_str("interrupted while waiting"),
            QueueError::GaveUp { attempts, last } => {
                write!(f, "gave up after {attempts} waits that broke off; the last: {last}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_the_commands_or_128_plus_the_signal() {
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        // Killed by SIGTERM (15), SIGKILL (9).
        assert_eq!(exit_code(ExitStatus::from_raw(15)), 143);
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137);
    }

    #[test]
    fn lost_locks_say_why_and_what_became_of_the_command() {
        let lost = LockLost { lease: LeaseId(0x1f), why: Lost::Gone, command: Some(Stopped::Terminated) };
        assert_eq!(
            lost.to_string(),
            "lock lost: lease 000000000000001f: it expired or was revoked; the command was stopped with SIGTERM"
        );
        let unconfirmed = LockLost {
            lease: LeaseId(0x1f),
            why: Lost::Unconfirmed {
                ttl: Duration::from_secs(10),
                last_error: Some("no endpoint answered: 127.0.0.1:2379 (connection refused)".into()),
            },
            command: Some(Stopped::Killed),
        };
        assert_eq!(
            unconfirmed.to_string(),
            "lock lost: lease 000000000000001f: no keep-alive was acknowledged for its whole TTL (10s); \
             last failure: no endpoint answered: 127.0.0.1:2379 (connection refused); the command did not \
             exit within 10s of SIGTERM and was killed"
        );
    }
}
