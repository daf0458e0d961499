//! `keel elect NAME VALUE`: campaigns in an election of the cluster (`/v1/election/…`) under a
//! lease kept alive meanwhile, leads until SIGINT or SIGTERM, then resigns; `keel elect -l NAME`
//! prints each leader as leadership changes.

use std::ffi::OsString;
use std::fmt;
use std::io::{self, Write as _};
use std::time::Duration;

use clap::Args;
use serde_json::Value;

use crate::client::{
    put_bytes_field, text_or_base64, with_query, ApiRequest, CampaignAnswer, Client, ClientError,
    LeaderAnswer,
};
use crate::lease::LeaseId;
use crate::lock::print_now;
use crate::output::show_bytes;
use crate::session::{self, Lost, Signals};
use crate::{key_bytes, CliError};

/// The TTL of the campaign's lease unless `--ttl` says otherwise.
const DEFAULT_TTL: i64 = 10;
/// Between two attempts to observe, after a stream broke off.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

/// `keel elect` flags.
#[derive(Args, Debug)]
pub struct ElectArgs {
    /// The election's name (its candidates' keys are `NAME/<lease id in hex>`).
    pub name: OsString,
    /// The value the leader proclaims (not with --listen).
    #[arg(required_unless_present = "listen", conflicts_with = "listen")]
    pub value: Option<OsString>,
    /// Do not campaign: print the leader's key and value each time leadership (or the leader's
    /// value) changes, until interrupted.
    #[arg(short = 'l', long)]
    pub listen: bool,
    /// Seconds the leadership outlives this process if it dies without resigning (the TTL of the
    /// lease it campaigns under).
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_TTL, value_parser = clap::value_parser!(i64).range(1..))]
    pub ttl: i64,
}

/// Leadership was lost while held: its lease is gone or can no longer be counted on.
#[derive(Debug)]
pub struct LeadershipLost {
    pub lease: LeaseId,
    pub why: Lost,
}

impl fmt::Display for LeadershipLost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "leadership lost: lease {}: {}", self.lease, self.why)
    }
}

pub async fn run(client: &Client, json: bool, args: ElectArgs) -> Result<String, CliError> {
    let name = key_bytes(args.name)?;
    match args.value {
        Some(value) if !args.listen => {
            campaign(client, json, &name, &value.into_encoded_bytes(), args.ttl).await
        }
        _ => listen(client, json, &name).await,
    }
}

/// Campaigns; once leading prints the leader key and the value, and holds until a signal.
async fn campaign(
    client: &Client,
    json: bool,
    name: &[u8],
    value: &[u8],
    ttl: i64,
) -> Result<String, CliError> {
    let mut signals = Signals::catch().map_err(CliError::Signals)?;
    let (mut session, answer) = session::queue(client, &mut signals, ttl, "elect", |lease| {
        let mut body = serde_json::Map::new();
        put_bytes_field(&mut body, "name", name);
        body.insert("lease".into(), lease.0.into());
        put_bytes_field(&mut body, "value", value);
        ApiRequest::post_json("/v1/election/campaign".into(), &Value::Object(body))
    })
    .await
    .map_err(|e| CliError::Queue("elect", Box::new(e)))?;
    let won: CampaignAnswer = answer.decode()?;
    let bad = |reason| ClientError::BadAnswer { endpoint: answer.endpoint.clone(), reason };
    let key = text_or_base64("key", won.key.as_deref(), won.key_base64.as_deref()).map_err(bad)?;
    let shown = if json {
        format!("{}\n", answer.body)
    } else {
        format!("{}\n{}\n", show_bytes(&key), show_bytes(value))
    };
    print_now(&shown)?;

    let lost = tokio::select! {
        _ = signals.recv() => None,
        lost = session.lost() => Some(lost),
    };
    if let Some(why) = lost {
        return Err(CliError::LeadershipLost(LeadershipLost { lease: session.lease, why }));
    }
    // Resign (only if this leadership still holds: the key's create revision is checked), then
    // revoke, which would delete the key anyway.
    let mut body = serde_json::Map::new();
    put_bytes_field(&mut body, "name", name);
    put_bytes_field(&mut body, "key", &key);
    body.insert("rev".into(), won.rev.into());
    body.insert("lease".into(), won.lease.into());
    let resign = ApiRequest::post_json("/v1/election/resign".into(), &Value::Object(body)).repeatable();
    let (lease, ttl) = (session.lease, session.ttl);
    let resigned = client.call(&resign).await;
    let revoked = session.end(client).await;
    if let Err(e) = resigned.map(drop).and(revoked) {
        eprintln!(
            "keel elect: could not resign ({e}); leadership ends when lease {lease} expires, within {}s",
            ttl.as_secs()
        );
    }
    Ok(String::new())
}

/// Observes the election: each leader once, as `KEY`, `VALUE` lines (`--json`: each server
/// message). A broken stream resumes on the next endpoint; the leader it starts with is not
/// printed again if it is the one printed last. Gives up after three rounds of endpoints that all
/// fail without a message.
async fn listen(client: &Client, json: bool, name: &[u8]) -> Result<String, CliError> {
    let endpoints = client.endpoints().to_vec();
    let path = with_query("/v1/election/observe", &[("name", name.to_vec())]);
    // The leader printed last: its key and the revision its value was written at.
    let mut last: Option<(Vec<u8>, i64)> = None;
    let mut failures = 0usize;
    for endpoint in endpoints.iter().cycle() {
        let mut printed_any = false;
        let mut server_error: Option<String> = None;
        let result = client
            .stream(endpoint, &path, |message| {
                if let Some(e) = message.get("error") {
                    server_error = Some(e.as_str().map_or_else(|| e.to_string(), str::to_owned));
                    return Ok(());
                }
                let leader: LeaderAnswer =
                    serde_json::from_value(message.clone()).map_err(io::Error::other)?;
                let kv = leader.kv.decode().map_err(|e| io::Error::other(e.to_string()))?;
                let id = (kv.key.clone(), leader.kv.mod_revision.unwrap_or(0));
                if last.as_ref() == Some(&id) {
                    return Ok(());
                }
                last = Some(id);
                let mut out = io::stdout().lock();
                if json {
                    writeln!(out, "{message}")?;
                } else {
                    let value = kv.value.unwrap_or_default();
                    write!(out, "{}\n{}\n", show_bytes(&kv.key), show_bytes(&value))?;
                }
                out.flush()?;
                printed_any = true;
                Ok(())
            })
            .await;
        let why = match result {
            Err(ClientError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(String::new()),
            Err(e @ (ClientError::Server { .. } | ClientError::Output(_))) => return Err(e.into()),
            Err(e) => e.to_string(),
            Ok(()) => match server_error {
                Some(e) => format!("{endpoint} ended the stream: {e}"),
                None => format!("{endpoint} ended the stream"),
            },
        };
        failures = if printed_any { 1 } else { failures + 1 };
        if failures >= 3 * endpoints.len() {
            return Err(CliError::Observe(why));
        }
        eprintln!("keel elect: {why}; observing on the next endpoint");
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
    Ok(String::new())
}
