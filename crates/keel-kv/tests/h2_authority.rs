//! HTTP/2 `:authority` values that real etcd clients send and the `h2` crate refuses
//! (`http://host:port` from etcdctl 3.4, `#initially=[…]` from Go clientv3 3.5.0–3.5.9): a raw
//! HTTP/2 client, written here frame by frame so that it can send them, against a real keeld.

mod procs;

use std::io::Read;
use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use procs::Procs;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const SETTINGS: u8 = 0x4;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const DATA: u8 = 0x0;
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// A raw HTTP/2 connection (prior knowledge, as gRPC clients speak it).
struct Raw {
    tcp: TcpStream,
    encoder: loona_hpack::Encoder<'static>,
    decoder: loona_hpack::Decoder<'static>,
}

impl Raw {
    fn connect(addr: &str) -> Raw {
        let mut tcp = TcpStream::connect(addr).expect("connect to keeld");
        tcp.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
        tcp.write_all(PREFACE).expect("preface");
        let mut raw = Raw { tcp, encoder: loona_hpack::Encoder::new(), decoder: loona_hpack::Decoder::new() };
        raw.send(SETTINGS, 0, 0, &[]);
        raw
    }

    fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = payload.len() as u32;
        let mut frame = len.to_be_bytes()[1..].to_vec();
        frame.extend([kind, flags]);
        frame.extend(stream.to_be_bytes());
        frame.extend(payload);
        self.tcp.write_all(&frame).expect("send a frame");
    }

    fn receive(&mut self) -> Frame {
        let mut head = [0u8; 9];
        self.tcp.read_exact(&mut head).expect("a frame from keeld");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0; len];
        self.tcp.read_exact(&mut payload).expect("the frame's payload");
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        Frame { kind: head[3], flags: head[4], stream, payload }
    }

    /// `GET path` on `stream` with `authority` (HPACK-encoded by a stateful encoder, so that a
    /// repeated header becomes a reference into the dynamic table), split over a HEADERS and a
    /// CONTINUATION frame when `split` is set. Answers the status and body, or the reason keeld
    /// refused the stream.
    fn get(
        &mut self,
        stream: u32,
        authority: &str,
        path: &str,
        split: bool,
    ) -> Result<(u16, String), String> {
        let headers: [(&[u8], &[u8]); 4] = [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":path", path.as_bytes()),
            (b":authority", authority.as_bytes()),
        ];
        let block = self.encoder.encode(headers);
        if split {
            let (a, b) = block.split_at(block.len() / 2);
            self.send(HEADERS, END_STREAM, stream, a);
            self.send(CONTINUATION, END_HEADERS, stream, b);
        } else {
            self.send(HEADERS, END_STREAM | END_HEADERS, stream, &block);
        }
        let mut status = None;
        let mut body = Vec::new();
        loop {
            let f = self.receive();
            match (f.kind, f.stream) {
                (GOAWAY, _) => return Err(format!("GOAWAY: {}", String::from_utf8_lossy(&f.payload[8..]))),
                (RST_STREAM, s) if s == stream => {
                    return Err(format!(
                        "RST_STREAM code {}",
                        u32::from_be_bytes(f.payload[..4].try_into().expect("an error code"))
                    ))
                }
                (HEADERS, s) if s == stream => {
                    assert_ne!(0, f.flags & END_HEADERS, "keeld's answer fits one frame");
                    for (name, value) in self.decoder.decode(&f.payload).expect("keeld's HPACK") {
                        if name == b":status" {
                            status = Some(
                                String::from_utf8(value).expect("a UTF-8 status").parse().expect("a status"),
                            );
                        }
                    }
                    if f.flags & END_STREAM != 0 {
                        break;
                    }
                }
                (DATA, s) if s == stream => {
                    body.extend(&f.payload);
                    if f.flags & END_STREAM != 0 {
                        break;
                    }
                }
                _ => {} // SETTINGS, their ACKs, WINDOW_UPDATEs, PINGs
            }
        }
        Ok((status.expect("a :status"), String::from_utf8_lossy(&body).into_owned()))
    }
}

#[test]
fn authorities_that_etcd_clients_send_are_served() {
    let c = Procs::start(1, 0, "");
    let addr = c.client(1);
    let mut raw = Raw::connect(&addr);

    // A plain authority passes as sent, before and after the connection has seen others.
    assert_eq!(
        Ok((200, r#"{"health":"true"}"#.to_string())),
        raw.get(1, &addr, "/health", false).map(normal)
    );
    let url = format!("http://{addr}");
    let go_35 = format!("#initially=[http://{addr};http://127.0.0.1:1]");
    // etcdctl 3.4's maintenance connections; then the same value again, which the client's
    // encoder now sends as a reference into its dynamic table.
    assert_eq!(Ok((200, r#"{"health":"true"}"#.to_string())), raw.get(3, &url, "/health", false).map(normal));
    assert_eq!(Ok((200, r#"{"health":"true"}"#.to_string())), raw.get(5, &url, "/health", true).map(normal));
    // Go clientv3 3.5.0–3.5.9 with several endpoints: nothing of it is an authority.
    assert_eq!(
        Ok((200, r#"{"health":"true"}"#.to_string())),
        raw.get(7, &go_35, "/health", false).map(normal)
    );
    assert_eq!(Ok((200, r#"{"health":"true"}"#.to_string())), raw.get(9, &addr, "/health", true).map(normal));
    // The connection still serves gRPC-free HTTP routes with a body.
    let (status, body) = raw.get(11, &go_35, "/v1/cluster/status", false).expect("status over HTTP/2");
    assert_eq!(200, status, "{body}");
    assert!(body.contains("\"leader\""), "{body}");
}

/// `/health`'s answer, whichever way keeld spells its JSON.
fn normal((status, body): (u16, String)) -> (u16, String) {
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body));
    let health = match &v["health"] {
        serde_json::Value::Bool(b) => b.to_string(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    (status, format!(r#"{{"health":"{health}"}}"#))
}

#[test]
fn hostile_header_blocks_end_the_connection_not_the_server() {
    let c = Procs::start(1, 0, "");
    let addr = c.client(1);

    // A header block past the bound: keeld closes the connection.
    let mut raw = Raw::connect(&addr);
    let chunk = vec![0u8; 16_000];
    raw.send(HEADERS, 0, 1, &chunk);
    for _ in 0..4 {
        raw.send(CONTINUATION, 0, 1, &chunk);
    }
    ends(raw);

    // A CONTINUATION for another stream, and garbage that is no HPACK at all.
    let mut raw = Raw::connect(&addr);
    raw.send(HEADERS, 0, 1, &[0x82]);
    raw.send(CONTINUATION, END_HEADERS, 3, &[0x84]);
    ends(raw);
    let mut raw = Raw::connect(&addr);
    raw.send(HEADERS, END_HEADERS | END_STREAM, 1, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
    ends(raw);

    // The server is unharmed.
    let mut raw = Raw::connect(&addr);
    assert_eq!(200, raw.get(1, &format!("http://{addr}"), "/health", false).expect("health").0);
}

/// keeld closes the connection (whatever it says first), within the read timeout.
fn ends(mut raw: Raw) {
    let mut rest = Vec::new();
    if let Err(e) = raw.tcp.read_to_end(&mut rest) {
        let closed = matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe);
        assert!(closed, "keeld kept the connection open: {e}");
    }
}
