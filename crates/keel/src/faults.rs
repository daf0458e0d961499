//! Planted bugs ("negative controls") that a fault-testing runner switches on to prove it catches
//! real bugs. Debug builds only: in a release build [`Faults`] has no fields and the faulty code
//! is not compiled at all.
//!
//! `KEEL_FAULT_INJECTION` names the faults, comma-separated; it is read once, when the node starts:
//!
//! - `stale-reads`: linearizable reads are served from this node's applied state, as serializable
//!   reads are: no ReadIndex, no leader check, no forwarding. A follower that is cut off or lagging,
//!   or a deposed leader, answers with stale data.
//! - `ack-before-fsync`: the Raft log reports appended entries as durable as soon as they are in
//!   the WAL's user-space buffer, and writes and fsyncs them only [`ACK_BEFORE_FSYNC_HOLD`] later.
//!   A `kill -9` in between loses entries a quorum counted as stored.
//! - `watch-drop-event`: for state machines that serve watches (keeld): one live watch delivery
//!   in every [`WATCH_DROP_EVERY`] loses its first event, silently. Watchers miss changes.
//! - `lease-early-expiry`: for state machines with leases (keeld): the leader acknowledges
//!   keep-alives without extending the lease, so a lease kept alive still expires its TTL after
//!   its grant or the last leader change. A lock holder loses its lock while it believes it holds.
//!
//! Each breaks a guarantee Keel otherwise gives (see `ARCHITECTURE.md`, Invariants); never set the
//! variable outside a test.

use std::fmt;

/// The environment variable that names the faults to plant.
pub const ENV_VAR: &str = "KEEL_FAULT_INJECTION";

/// How long `ack-before-fsync` keeps acknowledged entries in user space before writing and
/// fsyncing them: long enough that a `kill -9` lands in the window in a bounded number of runs.
#[cfg(debug_assertions)]
pub const ACK_BEFORE_FSYNC_HOLD: std::time::Duration = std::time::Duration::from_millis(50);

/// `watch-drop-event` drops an event from one live watch delivery in this many.
pub const WATCH_DROP_EVERY: u64 = 50;

/// The planted bugs a node runs with. The default plants none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// `stale-reads`: linearizable reads are served as serializable ones.
    #[cfg(debug_assertions)]
    pub stale_reads: bool,
    /// `ack-before-fsync`: appended entries are reported durable before they are written.
    #[cfg(debug_assertions)]
    pub ack_before_fsync: bool,
    /// `watch-drop-event`: watch deliveries lose an event now and then.
    #[cfg(debug_assertions)]
    pub watch_drop_event: bool,
    /// `lease-early-expiry`: the leader acknowledges keep-alives without extending the lease, so
    /// a lease expires its TTL after its grant (or the last leader change) however it is kept
    /// alive. (Applications that keep leases read it; keel itself keeps none.)
    #[cfg(debug_assertions)]
    pub lease_early_expiry: bool,
}

/// `KEEL_FAULT_INJECTION` cannot be honoured; the node must not start.
#[derive(Debug, thiserror::Error)]
pub enum FaultsError {
    #[error(
        "KEEL_FAULT_INJECTION: unknown fault {name:?} (known: stale-reads, ack-before-fsync, \
         watch-drop-event, lease-early-expiry, comma-separated)"
    )]
    Unknown { name: String },
    /// Refused rather than ignored, so a test runner never believes it tests a planted bug that is
    /// not there.
    #[error(
        "KEEL_FAULT_INJECTION is set, but fault injection exists only in debug builds and this is \
         a release build: unset KEEL_FAULT_INJECTION, or run a debug build of keeld"
    )]
    ReleaseBuild,
}

impl Faults {
    /// Reads [`ENV_VAR`]: unset plants nothing. A release build refuses any value.
    pub fn from_env() -> Result<Self, FaultsError> {
        match std::env::var_os(ENV_VAR) {
            None => Ok(Self::default()),
            // Not UTF-8: the replacement characters make it an unknown name (debug) or a refusal
            // anyway (release).
            Some(value) => Self::parse(&value.to_string_lossy()),
        }
    }

    /// Parses a comma-separated list of fault names (blanks around names and empty items are
    /// ignored, so an empty value plants nothing).
    #[cfg(debug_assertions)]
    pub fn parse(value: &str) -> Result<Self, FaultsError> {
        let mut faults = Self::default();
        for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "stale-reads" => faults.stale_reads = true,
                "ack-before-fsync" => faults.ack_before_fsync = true,
                "watch-drop-event" => faults.watch_drop_event = true,
                "lease-early-expiry" => faults.lease_early_expiry = true,
                _ => return Err(FaultsError::Unknown { name: name.to_string() }),
            }
        }
        Ok(faults)
    }

    /// A release build has no faults to plant: any value is refused.
    #[cfg(not(debug_assertions))]
    pub fn parse(_value: &str) -> Result<Self, FaultsError> {
        Err(FaultsError::ReleaseBuild)
    }

    /// Whether any fault is planted (always false in a release build).
    pub fn any(&self) -> bool {
        *self != Self::default()
    }
}

/// The planted faults by name, comma-separated (`none` when there are none).
impl fmt::Display for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        #[cfg(debug_assertions)]
        {
            let names: Vec<&str> = [
                (self.stale_reads, "stale-reads"),
                (self.ack_before_fsync, "ack-before-fsync"),
                (self.watch_drop_event, "watch-drop-event"),
                (self.lease_early_expiry, "lease-early-expiry"),
            ]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect();
            if !names.is_empty() {
                return f.write_str(&names.join(","));
            }
        }
        f.write_str("none")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_planted_by_default() {
        assert!(!Faults::default().any());
        assert_eq!("none", Faults::default().to_string());
    }

    #[cfg(debug_assertions)]
    #[test]
    fn names_are_parsed_and_unknown_ones_refused() {
        assert_eq!(Faults::default(), Faults::parse("").expect("empty"));
        let stale = Faults::parse("stale-reads").expect("one");
        assert!(stale.stale_reads && !stale.ack_before_fsync);
        let both = Faults::parse(" ack-before-fsync , stale-reads,").expect("both");
        assert!(both.stale_reads && both.ack_before_fsync);
        assert_eq!("stale-reads,ack-before-fsync", both.to_string());
        let err = Faults::parse("stale-reads,stale_reads").expect_err("unknown").to_string();
        assert!(err.contains("\"stale_reads\"") && err.contains("KEEL_FAULT_INJECTION"), "{err}");
    }

    #[cfg(not(debug_assertions))]
    #[test]
    fn a_release_build_refuses_any_value() {
        let err = Faults::parse("stale-reads").expect_err("release build").to_string();
        assert!(err.contains("only in debug builds"), "{err}");
    }
}
