//! `--op lock`: every client contends for one lock through etcd's `v3lockpb.Lock` service, each
//! under a lease of its own: `Lock` (which returns once this client holds the lock), then `Unlock`
//! of the key it got. One op is the pair. With one client that is two writes in a row; with N, a
//! `Lock` also waits for the holders before it, so the rate is bounded by the hand-offs (each an
//! `Unlock`'s delete seen by the next waiter), one at a time.

use std::time::Duration;

use tonic::transport::Channel;

use super::lease::{grant_all, revoke_all};
use super::load::{describe, measure, prepare, Requests};
use super::report::{ErrorTally, Row};
use super::wire::{decode_lock_response, lock_request, unary, unlock_request};
use super::{spread, BenchError, Plan};
use crate::client::Endpoint;

const LOCK: &str = "/v3lockpb.Lock/Lock";
const UNLOCK: &str = "/v3lockpb.Lock/Unlock";

/// Grants each client a lease (`Plan::lock_lease_ttl`: it outlives the run, so the contenders
/// need no keep-alives), runs the contention on a lock name new to this run, then revokes the
/// leases (which also deletes any lock key left behind).
pub async fn run(
    endpoints: &[Endpoint],
    timeout: Duration,
    plan: Plan,
) -> Result<(Row, ErrorTally), BenchError> {
    let (channels, plan) = prepare(endpoints, timeout, plan).await?;
    let leases = grant_all(&channels, plan.clients, plan.lock_lease_ttl()).await?;
    let name = lock_name(&mut rand::thread_rng());
    let clients = leases
        .iter()
        .enumerate()
        .filter_map(|(client, &lease)| {
            let channel = channels.get(spread(client, channels.len()))?;
            Some(Contender { channel: channel.clone(), name: name.clone(), lease })
        })
        .collect();
    let (total, elapsed) = measure(clients, &plan).await;
    revoke_all(&channels, leases).await;
    Ok((Row::new(&plan, &total, elapsed), total.errors))
}

/// `lock-<16 hex digits>`: a lock no other run contends for.
pub fn lock_name(rng: &mut impl rand::Rng) -> Vec<u8> {
    format!("lock-{:016x}", rng.gen::<u64>()).into_bytes()
}

struct Contender {
    channel: Channel,
    name: Vec<u8>,
    lease: i64,
}

impl Requests for Contender {
    async fn next(&mut self) -> Result<(), String> {
        let answer = unary(&mut self.channel, LOCK, &lock_request(&self.name, self.lease))
            .await
            .map_err(|s| format!("Lock: {}", describe(&s)))?;
        let key = match decode_lock_response(&answer) {
            Ok(Some(key)) if !key.is_empty() => key,
            Ok(_) => return Err("Lock: answered without a key".to_owned()),
            Err(e) => return Err(format!("Lock: a LockResponse {e}")),
        };
        unary(&mut self.channel, UNLOCK, &unlock_request(&key))
            .await
            .map(drop)
            .map_err(|s| format!("Unlock: {}", describe(&s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng as _;

    #[test]
    fn each_run_gets_its_own_lock() {
        let mut rng = StdRng::seed_from_u64(3);
        let (a, b) = (lock_name(&mut rng), lock_name(&mut rng));
        assert!(a.starts_with(b"lock-") && a.len() == 21, "{a:?}");
        assert_ne!(a, b);
    }
}
