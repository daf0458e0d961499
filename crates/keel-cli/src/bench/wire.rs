//! The RPCs the bench speaks without a generated client, encoded by hand:
//!
//! - `Watch`: create requests, and a response decoder that reads only what the bench needs (the
//!   watch id, the flags, each event's key) and skips the rest. The generated client would copy
//!   every value and allocate every key of every event; with 10,000 watchers that cost the client
//!   as much CPU as the server spent sending.
//! - `v3lockpb.Lock` (`Lock`, `Unlock`): etcd serves it beside the KV API; encoded here, the bench
//!   does not depend on which services `keel-kv` generates clients for.
//!
//! Protobuf wire format: each field is a varint tag (`field << 3 | wire type`) and a value: a varint
//! (type 0), 8 bytes (1), a varint length and that many bytes (2), or 4 bytes (5). Field numbers
//! are those of `crates/keel-kv/proto/etcdserverpb/rpc.proto` and `mvccpb/kv.proto`, which are
//! etcd's, and of etcd's `v3lockpb/v3lock.proto`:
//!
//! ```text
//! LockRequest    { bytes name = 1; int64 lease = 2; }
//! LockResponse   { etcdserverpb.ResponseHeader header = 1; bytes key = 2; }
//! UnlockRequest  { bytes key = 1; }
//! UnlockResponse { etcdserverpb.ResponseHeader header = 1; }
//! ```
//!
//! A gRPC message on the wire is framed: a compression flag byte (0), a big-endian u32 length, and
//! the protobuf.

use std::convert::Infallible;
use std::fmt;
use std::future::poll_fn;

use http_body_util::StreamBody;
use hyper::body::{Buf as _, Bytes, Frame};
use tonic::codec::{DecodeBuf, Decoder, Streaming};
use tonic::codegen::tokio_stream::{self, StreamExt as _};
use tonic::codegen::{http, Service as _};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// The largest response accepted: a watcher that fell behind may get many events in one.
const MAX_RESPONSE: usize = 256 * 1024 * 1024;

/// One `WatchResponse`, as far as the bench reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchBatch {
    pub watch_id: i64,
    pub created: bool,
    pub canceled: bool,
    pub cancel_reason: String,
    /// Put events on keys `prefix` + `put_key`'s suffix: (sequence number, send time).
    pub puts: Vec<(u64, u64)>,
    /// Other events: deletes, or keys this run did not make.
    pub others: u64,
}

/// A response that is not valid protobuf for its message (the caller names the message).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    /// The message ends inside a field.
    Truncated,
    /// A varint longer than 10 bytes.
    LongVarint,
    /// A wire type protobuf no longer uses (groups) or never defined.
    WireType(u8),
    /// A field the schema says is a message or bytes came with another wire type.
    Unexpected { field: u64 },
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Truncated => write!(f, "ends inside a field"),
            WireError::LongVarint => write!(f, "has a varint over 10 bytes"),
            WireError::WireType(t) => write!(f, "has wire type {t}"),
            WireError::Unexpected { field } => write!(f, "has field {field} with the wrong wire type"),
        }
    }
}

/// A field's value, borrowed from the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// Reads fields off a message, front to back.
struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    fn varint(&mut self) -> Result<u64, WireError> {
        let mut value = 0u64;
        for (i, &byte) in self.rest.iter().enumerate().take(10) {
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                self.rest = &self.rest[i + 1..];
                return Ok(value);
            }
        }
        Err(if self.rest.len() < 10 { WireError::Truncated } else { WireError::LongVarint })
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], WireError> {
        let n = usize::try_from(n).map_err(|_| WireError::Truncated)?;
        if n > self.rest.len() {
            return Err(WireError::Truncated);
        }
        let (taken, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(taken)
    }

    /// The next field number and value, or `None` at the end.
    fn next(&mut self) -> Result<Option<(u64, Value<'a>)>, WireError> {
        if self.rest.is_empty() {
            return Ok(None);
        }
        let tag = self.varint()?;
        let value = match tag & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed
            }
            2 => {
                let len = self.varint()?;
                Value::Bytes(self.take(len)?)
            }
            5 => {
                self.take(4)?;
                Value::Fixed
            }
            other => return Err(WireError::WireType(other as u8)),
        };
        Ok(Some((tag >> 3, value)))
    }
}

fn bytes(field: u64, value: Value<'_>) -> Result<&[u8], WireError> {
    match value {
        Value::Bytes(b) => Ok(b),
        _ => Err(WireError::Unexpected { field }),
    }
}

/// Decodes a `WatchResponse`, reading each event's key as one of `put_key`'s under `prefix`.
pub fn decode_response(message: &[u8], prefix: &[u8]) -> Result<WatchBatch, WireError> {
    let mut batch = WatchBatch::default();
    let mut fields = Fields { rest: message };
    while let Some((field, value)) = fields.next()? {
        match (field, value) {
            // int64 is two's complement in a varint: the cast is the decoding.
            (2, Value::Varint(v)) => batch.watch_id = v as i64,
            (3, Value::Varint(v)) => batch.created = v != 0,
            (4, Value::Varint(v)) => batch.canceled = v != 0,
            (6, v) => batch.cancel_reason = String::from_utf8_lossy(bytes(6, v)?).into_owned(),
            (11, v) => match decode_event(bytes(11, v)?, prefix)? {
                Some(put) => batch.puts.push(put),
                None => batch.others += 1,
            },
            // The header, compact_revision, fragment and any field added later.
            _ => {}
        }
    }
    Ok(batch)
}

/// An `mvccpb.Event`: `Some((seq, sent))` for a put on one of this run's keys.
fn decode_event(message: &[u8], prefix: &[u8]) -> Result<Option<(u64, u64)>, WireError> {
    let (mut is_put, mut key) = (true, None);
    let mut fields = Fields { rest: message };
    while let Some((field, value)) = fields.next()? {
        match (field, value) {
            // EventType PUT is 0, the default, so a put usually has no type field at all.
            (1, Value::Varint(t)) => is_put = t == 0,
            (2, v) => key = decode_key(bytes(2, v)?)?,
            _ => {}
        }
    }
    Ok(key.filter(|_| is_put).and_then(|key| key.strip_prefix(prefix)).and_then(parse_key))
}

/// An `mvccpb.KeyValue`'s key (field 1); the value and the revisions are skipped.
fn decode_key(message: &[u8]) -> Result<Option<&[u8]>, WireError> {
    let mut key = None;
    let mut fields = Fields { rest: message };
    while let Some((field, value)) = fields.next()? {
        if field == 1 {
            key = Some(bytes(1, value)?);
        }
    }
    Ok(key)
}

/// Put number `seq`'s key: `<prefix><seq, 10 digits>-<sent, ns since the run's base>`.
pub fn put_key(prefix: &[u8], seq: u64, sent_ns: u64) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(format!("{seq:010}-{sent_ns}").as_bytes());
    key
}

/// The sequence number and send time of a key made by `put_key` (given the part after the prefix).
pub fn parse_key(suffix: &[u8]) -> Option<(u64, u64)> {
    let dash = suffix.iter().position(|&b| b == b'-')?;
    Some((decimal(&suffix[..dash])?, decimal(&suffix[dash + 1..])?))
}

fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        let d = d.checked_sub(b'0').filter(|d| *d <= 9)?;
        n.checked_mul(10)?.checked_add(u64::from(d))
    })
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes_field(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(out, field << 3 | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// `message` as one gRPC message on the wire: uncompressed flag, big-endian length, the protobuf.
fn frame(message: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(message.len() + 5);
    frame.push(0);
    // The bench's requests are a few hundred bytes at most (keys and names), far under 4 GiB.
    frame.extend_from_slice(&u32::try_from(message.len()).unwrap_or(u32::MAX).to_be_bytes());
    frame.extend_from_slice(message);
    frame
}

/// A `WatchRequest` whose `create_request` watches `key`..`range_end` from now, as one gRPC
/// message.
pub fn create_request_frame(key: &[u8], range_end: &[u8]) -> Vec<u8> {
    let mut create = Vec::with_capacity(key.len() + range_end.len() + 8);
    put_bytes_field(&mut create, 1, key);
    put_bytes_field(&mut create, 2, range_end);
    let mut request = Vec::with_capacity(create.len() + 4);
    put_bytes_field(&mut request, 1, &create);
    frame(&request)
}

/// A `LockRequest` for the lock `name`, held under `lease`.
pub fn lock_request(name: &[u8], lease: i64) -> Vec<u8> {
    let mut request = Vec::with_capacity(name.len() + 16);
    put_bytes_field(&mut request, 1, name);
    put_varint(&mut request, 2 << 3);
    // int64 is two's complement in a varint: the cast is the encoding.
    put_varint(&mut request, lease as u64);
    request
}

/// An `UnlockRequest` releasing the lock held by the key a `LockResponse` gave.
pub fn unlock_request(key: &[u8]) -> Vec<u8> {
    let mut request = Vec::with_capacity(key.len() + 4);
    put_bytes_field(&mut request, 1, key);
    request
}

/// A `LockResponse`'s key: the holder's key, which `Unlock` deletes. `None` if it has none.
pub fn decode_lock_response(message: &[u8]) -> Result<Option<Vec<u8>>, WireError> {
    let mut key = None;
    let mut fields = Fields { rest: message };
    while let Some((field, value)) = fields.next()? {
        if field == 2 {
            key = Some(bytes(2, value)?.to_vec());
        }
    }
    Ok(key)
}

/// Decodes each response of a stream into a `WatchBatch`.
pub struct BatchDecoder {
    pub prefix: Vec<u8>,
}

impl Decoder for BatchDecoder {
    type Item = WatchBatch;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<WatchBatch>, Status> {
        let len = src.remaining();
        // tonic hands over a message in one contiguous buffer; copy only if that ever changes.
        let batch = if src.chunk().len() == len {
            decode_response(src.chunk(), &self.prefix)
        } else {
            decode_response(&src.copy_to_bytes(len), &self.prefix)
        };
        if src.remaining() > 0 {
            src.advance(src.remaining());
        }
        batch.map(Some).map_err(|e| Status::internal(format!("a WatchResponse {e}")))
    }
}

/// Hands over each response as its protobuf bytes, for the caller to decode.
struct RawDecoder;

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// Whether a call's request side ends after its messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RequestSide {
    /// A unary call: the messages, then the end of the stream.
    Ends,
    /// A bidi stream that must stay open: etcd ends a Watch stream whose client has stopped
    /// sending.
    StaysOpen,
}

/// Calls `path` on `channel` with `frames` (each a whole gRPC message) as the request, and returns
/// its responses, each decoded by `decoder`.
async fn call<D>(
    channel: &mut Channel,
    path: &'static str,
    frames: Vec<Vec<u8>>,
    request_side: RequestSide,
    decoder: D,
) -> Result<Streaming<D::Item>, Status>
where
    D: Decoder<Error = Status> + Send + 'static,
{
    let frames = tokio_stream::iter(frames).map(|f| Ok::<_, Infallible>(Frame::data(Bytes::from(f))));
    let body = match request_side {
        RequestSide::Ends => tonic::body::Body::new(StreamBody::new(frames)),
        RequestSide::StaysOpen => {
            tonic::body::Body::new(StreamBody::new(frames.chain(tokio_stream::pending())))
        }
    };
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(path)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(body)
        .map_err(|e| Status::internal(format!("cannot build the {path} request: {e}")))?;
    poll_fn(|cx| channel.poll_ready(cx)).await.map_err(|e| Status::unavailable(e.to_string()))?;
    let response = channel.call(request).await.map_err(|e| Status::unavailable(e.to_string()))?;
    // A server without the method answers with headers only, the status among them.
    if let Some(status) = Status::from_header_map(response.headers()) {
        if status.code() != Code::Ok {
            return Err(status);
        }
    }
    let status = response.status();
    Ok(Streaming::new_response(decoder, response.into_body(), status, None, Some(MAX_RESPONSE)))
}

/// Opens a Watch stream on `channel` whose request side sends `frames` (each a whole gRPC
/// message) and then stays open.
pub async fn open_watch(
    channel: &mut Channel,
    frames: Vec<Vec<u8>>,
    prefix: Vec<u8>,
) -> Result<Streaming<WatchBatch>, Status> {
    call(channel, "/etcdserverpb.Watch/Watch", frames, RequestSide::StaysOpen, BatchDecoder { prefix }).await
}

/// A unary call of `path` with the protobuf `message`; its answer's protobuf, once the server has
/// ended the call with status OK.
pub async fn unary(channel: &mut Channel, path: &'static str, message: &[u8]) -> Result<Bytes, Status> {
    let mut responses = call(channel, path, vec![frame(message)], RequestSide::Ends, RawDecoder).await?;
    let Some(answer) = responses.message().await? else {
        return Err(Status::internal(format!("{path} ended without an answer")));
    };
    // The trailers carry the call's status; reading past the answer checks it.
    match responses.message().await? {
        None => Ok(answer),
        Some(_) => Err(Status::internal(format!("{path} answered twice"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint_field(out: &mut Vec<u8>, field: u64, v: u64) {
        put_varint(out, field << 3);
        put_varint(out, v);
    }

    /// An `mvccpb.Event` as etcd encodes it: type (absent for PUT), kv, maybe prev_kv.
    fn event(delete: bool, key: &[u8], value: &[u8], prev: bool) -> Vec<u8> {
        let mut kv = Vec::new();
        put_bytes_field(&mut kv, 1, key);
        varint_field(&mut kv, 2, 7); // create_revision
        varint_field(&mut kv, 3, 300); // mod_revision: a two-byte varint
        varint_field(&mut kv, 4, 1);
        put_bytes_field(&mut kv, 5, value);
        let mut event = Vec::new();
        if delete {
            varint_field(&mut event, 1, 1);
        }
        put_bytes_field(&mut event, 2, &kv);
        if prev {
            put_bytes_field(&mut event, 3, &kv);
        }
        event
    }

    fn header() -> Vec<u8> {
        let mut h = Vec::new();
        varint_field(&mut h, 1, 0x1234_5678_9abc); // cluster_id
        varint_field(&mut h, 3, 42); // revision
        h
    }

    #[test]
    fn a_created_response_gives_its_id() {
        let mut m = Vec::new();
        put_bytes_field(&mut m, 1, &header());
        varint_field(&mut m, 2, 17);
        varint_field(&mut m, 3, 1);
        let batch = decode_response(&m, b"p/").expect("valid");
        assert_eq!(batch, WatchBatch { watch_id: 17, created: true, ..WatchBatch::default() });
        // etcd's first watcher on a stream is id 0, which proto3 does not encode at all.
        let mut m = Vec::new();
        varint_field(&mut m, 3, 1);
        assert_eq!(decode_response(&m, b"p/").expect("valid").watch_id, 0);
    }

    #[test]
    fn events_give_the_puts_of_this_run_and_count_the_rest() {
        let prefix = b"watch-00000000000000aa/";
        let mut m = Vec::new();
        put_bytes_field(&mut m, 1, &header());
        varint_field(&mut m, 2, 3);
        let value = vec![0xff; 256];
        put_bytes_field(&mut m, 11, &event(false, &put_key(prefix, 5, 99), &value, false));
        put_bytes_field(&mut m, 11, &event(false, &put_key(prefix, 6, 100), &value, true));
        put_bytes_field(&mut m, 11, &event(true, &put_key(prefix, 7, 101), b"", false));
        put_bytes_field(&mut m, 11, &event(false, b"key-00000001", &value, false));
        put_bytes_field(&mut m, 11, &event(false, &put_key(b"watch-other/", 8, 1), &value, false));
        varint_field(&mut m, 7, 0); // fragment
        put_varint(&mut m, 99 << 3 | 5); // an unknown fixed32 field
        m.extend_from_slice(&[1, 2, 3, 4]);
        let batch = decode_response(&m, prefix).expect("valid");
        assert_eq!(batch.watch_id, 3);
        assert_eq!(batch.puts, [(5, 99), (6, 100)]);
        assert_eq!(batch.others, 3);
    }

    #[test]
    fn a_canceled_response_gives_its_reason() {
        let mut m = Vec::new();
        varint_field(&mut m, 2, 1);
        varint_field(&mut m, 4, 1);
        varint_field(&mut m, 5, 10); // compact_revision
        put_bytes_field(&mut m, 6, b"mvcc: required revision has been compacted");
        let batch = decode_response(&m, b"p/").expect("valid");
        assert!(batch.canceled);
        assert_eq!(batch.cancel_reason, "mvcc: required revision has been compacted");
    }

    #[test]
    fn malformed_responses_are_refused() {
        let mut m = Vec::new();
        put_bytes_field(&mut m, 11, &event(false, b"p/1-1", b"v", false));
        for cut in 1..m.len() {
            assert_eq!(decode_response(&m[..cut], b"p/"), Err(WireError::Truncated), "cut at {cut}");
        }
        assert_eq!(decode_response(&[0x0b], b"p/"), Err(WireError::WireType(3)));
        assert_eq!(decode_response(&[0xff; 11], b"p/"), Err(WireError::LongVarint));
        // watch events (11) as a varint
        assert_eq!(decode_response(&[11 << 3, 1], b"p/"), Err(WireError::Unexpected { field: 11 }));
        assert_eq!(decode_response(&[], b"p/"), Ok(WatchBatch::default()));
    }

    #[test]
    fn the_create_request_is_one_grpc_message() {
        let frame = create_request_frame(b"watch-a/", b"watch-a0");
        // flag, length 22, WatchRequest { 1: WatchCreateRequest { 1: key, 2: range_end } }
        let mut expected = vec![0, 0, 0, 0, 22, 0x0a, 20, 0x0a, 8];
        expected.extend_from_slice(b"watch-a/");
        expected.extend_from_slice(&[0x12, 8]);
        expected.extend_from_slice(b"watch-a0");
        assert_eq!(frame, expected);
    }

    #[test]
    fn lock_requests_are_etcds_messages() {
        // LockRequest { 1: name, 2: lease } and UnlockRequest { 1: key }, as etcd's Go client
        // encodes them.
        let mut expected = vec![0x0a, 4];
        expected.extend_from_slice(b"lock");
        expected.extend_from_slice(&[0x10, 0xac, 0x02]);
        assert_eq!(lock_request(b"lock", 300), expected);
        let mut expected = vec![0x0a, 6];
        expected.extend_from_slice(b"lock/1");
        assert_eq!(unlock_request(b"lock/1"), expected);
        assert_eq!(frame(&[7, 8]), [0, 0, 0, 0, 2, 7, 8]);
    }

    #[test]
    fn a_lock_response_gives_the_holders_key() {
        let mut m = Vec::new();
        put_bytes_field(&mut m, 1, &header());
        put_bytes_field(&mut m, 2, b"lock-a/694d7f1b2c3d4e5f");
        assert_eq!(decode_lock_response(&m), Ok(Some(b"lock-a/694d7f1b2c3d4e5f".to_vec())));
        assert_eq!(decode_lock_response(&[]), Ok(None));
        assert_eq!(decode_lock_response(&m[..m.len() - 1]), Err(WireError::Truncated));
        assert_eq!(decode_lock_response(&[2 << 3, 1]), Err(WireError::Unexpected { field: 2 }));
    }

    #[test]
    fn keys_carry_the_sequence_and_the_send_time() {
        let key = put_key(b"p/", 42, 1_234_567_890);
        assert_eq!(key, b"p/0000000042-1234567890");
        assert_eq!(parse_key(&key[2..]), Some((42, 1_234_567_890)));
        for junk in [&b""[..], b"42", b"x-1", b"1-", b"-1", b"1-2x", b"99999999999999999999-1"] {
            assert_eq!(parse_key(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn varints_round_trip() {
        for v in [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            let mut fields = Fields { rest: &out };
            assert_eq!(fields.varint(), Ok(v));
            assert!(fields.rest.is_empty());
        }
    }
}
