//! Test helpers shared by Keel's crates.
//!
//! Loopback ports for servers a test starts. A port picked by binding port 0 and releasing the
//! listener comes from the kernel's ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`),
//! the same range it takes the local port of every outgoing connection from: with many tests
//! running at once, a connection or another port-0 bind takes the port before the server binds it
//! (`AddrInUse`). [`free_ports`] picks ports outside that range, and reserves each one with a file
//! lock that the other test processes of this machine honour.
//!
//! [`pki`]: throwaway CAs and certificates for the TLS tests.

pub mod pki;

use std::collections::hash_map::RandomState;
use std::collections::BTreeSet;
use std::fs::File;
use std::fs::OpenOptions;
use std::fs::TryLockError;
use std::hash::BuildHasher as _;
use std::hash::Hasher as _;
use std::net::Ipv4Addr;
use std::net::TcpListener;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::PoisonError;
use std::time::SystemTime;

/// Linux's default ephemeral range, for when `ip_local_port_range` cannot be read.
const DEFAULT_EPHEMERAL: RangeInclusive<u16> = 32768..=60999;
/// The lowest port handed out: below it live the ports of well-known services.
const LOWEST: u16 = 10_000;

/// The ports this process handed out, and the open lock file of each (its lock lasts as long as
/// the process: the kernel drops it when the process exits, however it exits).
static RESERVED: Mutex<Reserved> = Mutex::new(Reserved { ports: BTreeSet::new(), locks: Vec::new() });

struct Reserved {
    ports: BTreeSet<u16>,
    locks: Vec<File>,
}

/// `n` distinct loopback ports, free now and reserved for this process until it exits.
///
/// Each port is outside the ephemeral range, so no outgoing connection and no port-0 bind takes
/// it; it is handed out once per process, and skipped by any other process that calls this while
/// this one lives (an exclusive lock on `<temp dir>/keel-test-ports/<port>.lock`). Only a process
/// that binds fixed ports of its own could still take one. Where the lock file cannot be opened
/// (an unwritable temp dir), a port is reserved within this process only.
///
/// Panics when fewer than `n` such ports are free.
pub fn free_ports(n: usize) -> Vec<u16> {
    let pool = candidates(&ephemeral_range());
    let start = if pool.is_empty() { 0 } else { (seed() % pool.len() as u64) as usize };
    let ports = reserve(n, pool.iter().cycle().skip(start).take(pool.len()).copied());
    assert_eq!(
        ports.len(),
        n,
        "only {} of {n} loopback ports outside the ephemeral range are free",
        ports.len()
    );
    ports
}

/// Reserves up to `n` ports of `order`, in that order: each one neither reserved already nor
/// bound now.
fn reserve(n: usize, order: impl Iterator<Item = u16>) -> Vec<u16> {
    let mut reserved = RESERVED.lock().unwrap_or_else(PoisonError::into_inner);
    let mut ports = Vec::with_capacity(n);
    for port in order {
        if ports.len() == n {
            break;
        }
        if reserved.ports.contains(&port) {
            continue;
        }
        let lock = match lock(port) {
            Lock::Held(file) => Some(file),
            Lock::Taken => continue,
            Lock::Unavailable => None,
        };
        // Bound by a process that is not a Keel test: not free (dropping `lock` releases it).
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_err() {
            continue;
        }
        reserved.ports.insert(port);
        reserved.locks.extend(lock);
        ports.push(port);
    }
    ports
}

/// One port of [`free_ports`].
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// The kernel's ephemeral port range.
fn ephemeral_range() -> RangeInclusive<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| parse_range(&s))
        .unwrap_or(DEFAULT_EPHEMERAL)
}

/// `ip_local_port_range`'s format: the first and the last port, whitespace-separated.
fn parse_range(s: &str) -> Option<RangeInclusive<u16>> {
    let mut it = s.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi)), None) if lo <= hi => Some(lo..=hi),
        _ => None,
    }
}

/// The ports that may be handed out: from [`LOWEST`] up, the ephemeral range left out.
fn candidates(ephemeral: &RangeInclusive<u16>) -> Vec<u16> {
    (LOWEST..=u16::MAX).filter(|p| !ephemeral.contains(p)).collect()
}

/// Where to start in the candidates: differs between processes started at the same moment (pid)
/// and between runs (time), so concurrent test processes seldom try the same ports first.
fn seed() -> u64 {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let mut h = RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(nanos);
    h.finish()
}

enum Lock {
    /// This process holds the port's lock while the file stays open.
    Held(File),
    /// A live process reserved the port.
    Taken,
    /// The lock file cannot be opened or locked.
    Unavailable,
}

fn lock_path(port: u16) -> PathBuf {
    std::env::temp_dir().join("keel-test-ports").join(format!("{port}.lock"))
}

/// Takes the port's lock without waiting. The lock files stay behind: removing one while another
/// process opens it would let two processes each lock a different file of the same name.
fn lock(port: u16) -> Lock {
    let path = lock_path(port);
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    // Read-only when it exists but is not ours to write (another user's): locks work on it too.
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .or_else(|_| File::open(&path));
    let Ok(file) = file else { return Lock::Unavailable };
    match file.try_lock() {
        Ok(()) => Lock::Held(file),
        Err(TryLockError::WouldBlock) => Lock::Taken,
        Err(TryLockError::Error(_)) => Lock::Unavailable,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn ports_are_distinct_outside_the_ephemeral_range_and_bindable() {
        let ephemeral = ephemeral_range();
        let ports = free_ports(40);
        assert_eq!(ports.len(), 40);
        assert_eq!(ports.iter().collect::<HashSet<_>>().len(), 40, "{ports:?}");
        for &p in &ports {
            assert!(p >= LOWEST && !ephemeral.contains(&p), "{p} in the ephemeral range {ephemeral:?}");
            TcpListener::bind((Ipv4Addr::LOCALHOST, p)).unwrap_or_else(|e| panic!("bind {p}: {e}"));
        }
    }

    #[test]
    fn a_port_is_handed_out_once_per_process() {
        let mut seen = HashSet::new();
        for _ in 0..20 {
            for p in free_ports(3).into_iter().chain([free_port()]) {
                assert!(seen.insert(p), "{p} handed out twice");
            }
        }
        // Not even when its server has stopped and the port is free again.
        let p = free_port();
        drop(TcpListener::bind((Ipv4Addr::LOCALHOST, p)).expect("bind"));
        assert!(!free_ports(50).contains(&p));
    }

    #[test]
    fn a_reserved_port_is_locked_against_other_processes() {
        let p = free_port();
        // A second open file of the lock is what another process would open: its lock fails.
        let other = File::open(lock_path(p)).expect("the lock file exists");
        assert!(matches!(other.try_lock(), Err(TryLockError::WouldBlock)), "port {p} is not locked");
        assert!(matches!(lock(p), Lock::Taken));
    }

    #[test]
    fn a_port_bound_by_another_server_is_skipped() {
        // Bound without a reservation, as by a process that is not a Keel test.
        let held = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind port 0");
        let taken = held.local_addr().expect("addr").port();
        let pool = candidates(&ephemeral_range());
        let got = reserve(1, std::iter::once(taken).chain(pool));
        assert_eq!(got.len(), 1);
        assert_ne!(got[0], taken, "a bound port was handed out");
    }

    #[test]
    fn the_ephemeral_range_is_read_and_left_out() {
        assert_eq!(parse_range("32768\t60999\n"), Some(32768..=60999));
        assert_eq!(parse_range("1024 65535"), Some(1024..=65535));
        assert_eq!(parse_range("60999 32768"), None);
        assert_eq!(parse_range("garbage"), None);
        assert_eq!(parse_range("1 2 3"), None);
        let pool = candidates(&(32768..=60999));
        assert_eq!(pool.first(), Some(&LOWEST));
        assert_eq!(pool.last(), Some(&u16::MAX));
        assert!(pool.contains(&32767) && pool.contains(&61000));
        assert!(!pool.contains(&32768) && !pool.contains(&60999));
        assert!(candidates(&(1024..=65535)).is_empty());
    }
}
