//! `keel lease grant|revoke|keep-alive|ttl|list` over `/v1/lease/…`, and lease ids as people
//! read and write them.

use std::fmt;
use std::io::{self, Write as _};
use std::time::Duration;

use clap::Subcommand;
use serde_json::json;
use tokio::time::Instant;

use crate::client::{
    decode_kvs, with_query, ApiRequest, Client, ClientError, LeaseAnswer, LeaseTtlAnswer, LeasesAnswer,
};
use crate::output;
use crate::session::{lease_body, ttl_duration, Keeper, Signals};
use crate::CliError;

/// Before the first keep-alive is answered there is no TTL to pace the retries by.
const FIRST_RETRY: Duration = Duration::from_millis(500);

/// A lease id. An i64 on the wire (a JSON number); 16 hex digits for people, as etcdctl prints
/// it (`694d5765fc71500b`), the i64's two's complement bits for the rare negative id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseId(pub i64);

impl LeaseId {
    /// Reads an id given on the command line, in hex as keel and etcdctl print it or in decimal
    /// as the JSON answers have it:
    ///
    /// - `0x…`, exactly 16 hex digits (the printed form), or any hex digits with a letter among
    ///   them: hex;
    /// - any other run of decimal digits (a leading `-` or `+` allowed): decimal.
    ///
    /// So a decimal id of exactly 16 digits must be written with a leading `0` or `+` (the
    /// cluster's ids are random 63-bit numbers, usually 18 or 19 digits long).
    pub fn parse(text: &str) -> Result<LeaseId, String> {
        let t = text.trim();
        let hex = |digits: &str| {
            if digits.is_empty() || digits.len() > 16 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            // The bits of the i64, as printed: ffffffffffffffff is -1.
            u64::from_str_radix(digits, 16).ok().map(|bits| bits as i64)
        };
        let parsed = if let Some(digits) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
            hex(digits)
        } else if t.len() == 16 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex(t)
        } else if t.trim_start_matches(['-', '+']).bytes().all(|b| b.is_ascii_digit()) {
            t.parse::<i64>().ok()
        } else {
            hex(t)
        };
        match parsed {
            Some(0) => Err("0 is not a lease id".to_owned()),
            Some(id) => Ok(LeaseId(id)),
            None => {
                Err(format!("'{text}' is not a lease id (hex digits as keel prints it, or a decimal number)"))
            }
        }
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

#[derive(Subcommand, Debug)]
pub enum LeaseCommand {
    /// Grant a lease of TTL seconds (a TTL under the cluster's minimum is raised to it); prints
    /// its id.
    Grant {
        /// Seconds the lease lives without a keep-alive.
        #[arg(value_parser = clap::value_parser!(i64).range(1..))]
        ttl: i64,
        /// Grant it under this id (hex or decimal) instead of one the cluster picks.
        #[arg(long, value_name = "ID", value_parser = LeaseId::parse)]
        id: Option<LeaseId>,
    },
    /// Revoke a lease: the keys attached to it are deleted, all in one revision.
    Revoke {
        /// The lease id (hex as printed, or decimal).
        #[arg(value_parser = LeaseId::parse)]
        id: LeaseId,
    },
    /// Keep a lease alive, every third of its TTL, until interrupted or the lease is gone (exit 1);
    /// prints each renewal.
    KeepAlive {
        /// The lease id (hex as printed, or decimal).
        #[arg(value_parser = LeaseId::parse)]
        id: LeaseId,
        /// Renew it once, print the TTL, and exit.
        #[arg(long)]
        once: bool,
    },
    /// A lease's granted TTL and the seconds left of it.
    Ttl {
        /// The lease id (hex as printed, or decimal).
        #[arg(value_parser = LeaseId::parse)]
        id: LeaseId,
        /// Also list the keys attached to it.
        #[arg(long)]
        keys: bool,
    },
    /// List every lease.
    List,
}

pub async fn run(client: &Client, json: bool, command: LeaseCommand) -> Result<String, CliError> {
    match command {
        LeaseCommand::Grant { ttl, id } => {
            let mut body = json!({"ttl": ttl});
            if let (Some(id), Some(obj)) = (id, body.as_object_mut()) {
                obj.insert("id".into(), id.0.into());
            }
            let answer = client.call(&ApiRequest::post_json("/v1/lease/grant".into(), &body)).await?;
            if json {
                return Ok(output::json_line(&answer.body));
            }
            let granted: LeaseAnswer = answer.decode()?;
            Ok(output::lease_granted(LeaseId(granted.id), granted.ttl))
        }
        LeaseCommand::Revoke { id } => {
            let answer =
                client.call(&ApiRequest::post_json("/v1/lease/revoke".into(), &lease_body(id))).await?;
            if json {
                return Ok(output::json_line(&answer.body));
            }
            Ok(output::lease_revoked(id))
        }
        LeaseCommand::KeepAlive { id, once } => keep_alive(client, json, id, once).await,
        LeaseCommand::Ttl { id, keys } => {
            let mut params = vec![("id", id.0.to_string().into_bytes())];
            if keys {
                params.push(("keys", b"true".to_vec()));
            }
            let answer = match client.call(&ApiRequest::get(with_query("/v1/lease/ttl", &params))).await {
                Ok(answer) => answer,
                // As etcdctl: a lease that is gone is an answer, not an error (TTL -1 in JSON,
                // the shape of etcd's LeaseTimeToLiveResponse).
                Err(e) if e.code() == Some("lease_not_found") => {
                    if json {
                        let gone = json!({"id": id.0, "ttl": -1, "granted_ttl": 0, "keys": []});
                        return Ok(output::json_line(&gone));
                    }
                    return Ok(output::lease_expired(id));
                }
                Err(e) => return Err(e.into()),
            };
            if json {
                return Ok(output::json_line(&answer.body));
            }
            let ttl: LeaseTtlAnswer = answer.decode()?;
            let attached: Vec<Vec<u8>> =
                decode_kvs(&answer.endpoint, &ttl.keys)?.into_iter().map(|kv| kv.key).collect();
            Ok(output::lease_ttl(LeaseId(ttl.id), ttl.granted_ttl, ttl.ttl, keys.then_some(&attached[..])))
        }
        LeaseCommand::List => {
            let answer = client.call(&ApiRequest::get("/v1/lease/list".into())).await?;
            if json {
                return Ok(output::json_line(&answer.body));
            }
            let list: LeasesAnswer = answer.decode()?;
            let ids: Vec<LeaseId> = list.leases.into_iter().map(LeaseId).collect();
            Ok(output::leases(&ids))
        }
    }
}

/// `keel lease keep-alive`: renews every third of the TTL, printing each renewal, until SIGINT
/// or SIGTERM (exit 0) or the cluster answers that the lease is gone (exit 1). While no endpoint
/// answers it keeps trying, saying so once on stderr: only the cluster can tell whether the lease
/// outlived the silence.
async fn keep_alive(client: &Client, json: bool, id: LeaseId, once: bool) -> Result<String, CliError> {
    let request = ApiRequest::post_json("/v1/lease/keepalive".into(), &lease_body(id)).repeatable();
    let print = |answer_json: &serde_json::Value, renewed: &LeaseAnswer| -> String {
        if json {
            output::json_line(answer_json)
        } else {
            output::lease_kept_alive(LeaseId(renewed.id), renewed.ttl)
        }
    };
    if once {
        let answer = client.call(&request).await?;
        let renewed: LeaseAnswer = answer.decode()?;
        return Ok(print(&answer.body, &renewed));
    }
    let mut signals = Signals::catch().map_err(CliError::Signals)?;
    let mut keeper: Option<Keeper> = None;
    let mut failing = false;
    loop {
        let sent = Instant::now();
        let per_request = keeper.as_ref().map_or(client.timeout(), |k| k.request_timeout(client.timeout()));
        let paced = client.with_timeout(per_request);
        let result = tokio::select! {
            result = paced.call(&request) => result,
            _ = signals.recv() => return Ok(String::new()),
        };
        let next = match result {
            Ok(answer) => {
                let renewed: LeaseAnswer = answer.decode()?;
                let line = print(&answer.body, &renewed);
                let mut out = io::stdout().lock();
                match out.write_all(line.as_bytes()).and_then(|()| out.flush()) {
                    Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(String::new()),
                    Err(e) => return Err(ClientError::Output(e).into()),
                    Ok(()) => {}
                }
                let ttl = ttl_duration(renewed.ttl);
                let keeper = keeper.get_or_insert_with(|| Keeper::granted(sent, ttl));
                keeper.renewed(sent, ttl);
                failing = false;
                keeper.next()
            }
            Err(e) if e.code() == Some("lease_not_found") => return Err(e.into()),
            Err(e) => {
                if !failing {
                    eprintln!("keel lease keep-alive: {e}; trying again");
                }
                failing = true;
                match keeper.as_mut() {
                    Some(keeper) => {
                        keeper.failed(Instant::now());
                        keeper.next()
                    }
                    None => Instant::now() + FIRST_RETRY,
                }
            }
        };
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            _ = signals.recv() => return Ok(String::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_print_as_sixteen_hex_digits_and_read_back() {
        for id in [1, 10, 0x694d_5765_fc71_500b, i64::MAX, -1, i64::MIN] {
            let shown = LeaseId(id).to_string();
            assert_eq!(shown.len(), 16, "{shown}");
            assert_eq!(LeaseId::parse(&shown), Ok(LeaseId(id)), "{shown}");
        }
        assert_eq!(LeaseId(0x694d_5765_fc71_500b).to_string(), "694d5765fc71500b");
        assert_eq!(LeaseId(-1).to_string(), "ffffffffffffffff");
    }

    #[test]
    fn ids_read_as_hex_or_decimal() {
        let ok = |t: &str| LeaseId::parse(t).map(|id| id.0);
        // Hex: the printed form, 0x, or a letter among the digits.
        assert_eq!(ok("694d5765fc71500b"), Ok(0x694d_5765_fc71_500b));
        assert_eq!(ok("0000000000000010"), Ok(16));
        assert_eq!(ok("0x10"), Ok(16));
        assert_eq!(ok("0X1F"), Ok(31));
        assert_eq!(ok("1a"), Ok(26));
        assert_eq!(ok("DEADBEEF"), Ok(0xdead_beef));
        // Decimal: what --json prints.
        assert_eq!(ok("10"), Ok(10));
        assert_eq!(ok("7587817042727751691"), Ok(7_587_817_042_727_751_691));
        assert_eq!(ok("-5"), Ok(-5));
        // A 16-digit decimal, written so that it is not the printed hex form.
        assert_eq!(ok("+1234567890123456"), Ok(1_234_567_890_123_456));
        assert_eq!(ok("01234567890123456"), Ok(1_234_567_890_123_456));
        assert_eq!(ok("1234567890123456"), Ok(0x1234_5678_9012_3456));
    }

    #[test]
    fn what_is_not_an_id_is_refused() {
        for bad in [
            "",
            "0",
            "0x0",
            "0000000000000000",
            "xyz",
            "0x",
            "12g",
            "99999999999999999999",
            "0x1ffffffffffffffff",
        ] {
            assert!(LeaseId::parse(bad).is_err(), "{bad:?} is not an id");
        }
        assert_eq!(
            LeaseId::parse("xyz"),
            Err("'xyz' is not a lease id (hex digits as keel prints it, or a decimal number)".to_owned())
        );
        assert_eq!(LeaseId::parse("0"), Err("0 is not a lease id".to_owned()));
    }
}
