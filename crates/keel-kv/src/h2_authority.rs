//! Lenient `:authority` on the client port's HTTP/2 connections.
//!
//! Go's gRPC server takes any `:authority`; the `h2` crate under hyper resets a request whose
//! `:authority` is not a URI authority (hyperium/h2#525). Real etcd clients send such values:
//! etcdctl 3.4 sends `http://host:port` on its maintenance connections (`endpoint status
//! --cluster`, `defrag --cluster`, any command with `--endpoints=http://…`), and Go clientv3
//! 3.5.0–3.5.9 with several endpoints sends `#initially=[…]` (etcd-io/etcd#13192) on every call.
//!
//! [`LenientAuthority`] sits between the socket (or TLS stream) and hyper, on the bytes the client
//! sends; what the server sends passes untouched. It follows the client's HTTP/2 frames, decodes
//! every header block with its own HPACK decoder (so it tracks the client's dynamic table), and
//! when a block's `:authority` would be refused it rewrites it: the authority inside a URL
//! (`http://host:port/…` → `host:port`), or no `:authority` at all when none can be found (h2
//! accepts a request without one; nothing in Keel reads it). From the first rewritten block on,
//! every block is re-encoded with literals that never touch the dynamic table, because the
//! server's table no longer matches the client's; before that, blocks pass as the client sent
//! them. Frames other than header blocks pass through as they arrive, payload streamed, never
//! buffered whole.
//!
//! Bounds: a header block (HEADERS and its CONTINUATIONs) larger than [`MAX_HEADER_BLOCK`] ends
//! the connection, as does a client that breaks HTTP/2's framing rules this layer relies on
//! (CONTINUATION for another stream, a frame inside a header block, padding longer than the
//! frame). The HPACK table may not grow past the 4,096 bytes HTTP/2 allows by default (the server
//! never advertises more). A block the decoder cannot read is passed on as it came, and this
//! layer stops interpreting the connection: h2 answers the client's compression error itself.
//!
//! A connection that does not open with the HTTP/2 preface (HTTP/1.1) is passed through at once.

use std::io;
use std::pin::Pin;
use std::task::Context;
use std::task::Poll;

use bytes::Buf;
use bytes::BufMut;
use bytes::BytesMut;
use tokio::io::AsyncRead;
use tokio::io::AsyncWrite;
use tokio::io::ReadBuf;

/// The client connection preface of HTTP/2 (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The largest header block (compressed, all its frames) a client may send. hyper's server
/// refuses decoded header lists above 16 KiB, and HPACK never expands what it encodes by much.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// HPACK's dynamic table size when the server advertises none (RFC 7541 §4.2).
const HPACK_TABLE_SIZE: u32 = 4096;
/// The frame size every HTTP/2 peer accepts (SETTINGS_MAX_FRAME_SIZE's initial value).
const MAX_FRAME: usize = 16_384;

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Wraps one accepted connection; see the module documentation.
pub struct LenientAuthority<IO> {
    io: IO,
    mode: Mode,
    /// Bytes read from the client and not yet looked at.
    raw: BytesMut,
    /// Bytes looked at, ready for hyper.
    out: BytesMut,
    /// Payload bytes of the current non-header frame still to pass on.
    passing: usize,
    /// The header block being collected, until its END_HEADERS.
    block: Option<Block>,
    decoder: httlib_hpack::Decoder<'static>,
    /// Re-encode every block from now on (one has been rewritten).
    reencode: bool,
    eof: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum Mode {
    /// Reading the first bytes: the HTTP/2 preface or not.
    Preface,
    /// Following HTTP/2 frames.
    Frames,
    /// Passing every byte through untouched (HTTP/1.1, or a block the decoder could not read).
    Plain,
}

struct Block {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    /// The block's frames as the client sent them.
    frames: BytesMut,
    /// The HPACK fragments, joined.
    fragments: BytesMut,
}

impl<IO> LenientAuthority<IO> {
    pub fn new(io: IO) -> Self {
        let decoder = httlib_hpack::Decoder::with_dynamic_size(HPACK_TABLE_SIZE);
        LenientAuthority {
            io,
            mode: Mode::Preface,
            raw: BytesMut::new(),
            out: BytesMut::new(),
            passing: 0,
            block: None,
            decoder,
            reencode: false,
            eof: false,
        }
    }

    /// Moves as much of `raw` into `out` as can be decided now.
    fn process(&mut self) -> io::Result<()> {
        loop {
            match self.mode {
                Mode::Plain => {
                    self.out.unsplit(self.raw.split());
                    return Ok(());
                }
                Mode::Preface => {
                    let n = self.raw.len().min(PREFACE.len());
                    if self.raw[..n] != PREFACE[..n] {
                        self.mode = Mode::Plain;
                        continue;
                    }
                    if n < PREFACE.len() {
                        return Ok(());
                    }
                    self.out.unsplit(self.raw.split_to(PREFACE.len()));
                    self.mode = Mode::Frames;
                }
                Mode::Frames => {
                    if self.passing > 0 {
                        let n = self.passing.min(self.raw.len());
                        if n == 0 {
                            return Ok(());
                        }
                        self.out.unsplit(self.raw.split_to(n));
                        self.passing -= n;
                        continue;
                    }
                    if self.raw.len() < 9 {
                        return Ok(());
                    }
                    let len = usize::from(self.raw[0]) << 16
                        | usize::from(self.raw[1]) << 8
                        | usize::from(self.raw[2]);
                    let kind = self.raw[3];
                    if kind != HEADERS && kind != CONTINUATION {
                        if self.block.is_some() {
                            return Err(protocol("a frame other than CONTINUATION inside a header block"));
                        }
                        self.out.unsplit(self.raw.split_to(9));
                        self.passing = len;
                        continue;
                    }
                    let collected = self.block.as_ref().map_or(0, |b| b.frames.len());
                    if collected + 9 + len > MAX_HEADER_BLOCK {
                        return Err(protocol("header block too large"));
                    }
                    if self.raw.len() < 9 + len {
                        return Ok(());
                    }
                    let frame = self.raw.split_to(9 + len);
                    self.header_frame(frame)?;
                }
            }
        }
    }

    fn header_frame(&mut self, frame: BytesMut) -> io::Result<()> {
        let kind = frame[3];
        let flags = frame[4];
        let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let payload = &frame[9..];
        match kind {
            HEADERS => {
                if self.block.is_some() {
                    return Err(protocol("HEADERS inside a header block"));
                }
                let mut start = 0;
                let mut end = payload.len();
                if flags & PADDED != 0 {
                    let pad = usize::from(
                        *payload.first().ok_or_else(|| protocol("padded HEADERS without its length"))?,
                    );
                    start = 1;
                    end = end.checked_sub(pad).ok_or_else(|| protocol("padding longer than the frame"))?;
                }
                let mut priority = None;
                if flags & PRIORITY != 0 {
                    let p = payload
                        .get(start..start + 5)
                        .ok_or_else(|| protocol("HEADERS too short for its priority"))?;
                    priority = Some(p.try_into().expect("five bytes"));
                    start += 5;
                }
                if start > end {
                    return Err(protocol("padding longer than the frame"));
                }
                let mut fragments = BytesMut::with_capacity(end - start);
                fragments.extend_from_slice(&payload[start..end]);
                self.block = Some(Block {
                    stream,
                    end_stream: flags & END_STREAM != 0,
                    priority,
                    frames: frame,
                    fragments,
                });
            }
            _ => {
                let block =
                    self.block.as_mut().ok_or_else(|| protocol("CONTINUATION outside a header block"))?;
                if block.stream != stream {
                    return Err(protocol("CONTINUATION for another stream"));
                }
                block.fragments.extend_from_slice(payload);
                block.frames.unsplit(frame);
            }
        }
        if flags & END_HEADERS != 0 {
            let block = self.block.take().expect("collected above");
            self.finish(block)?;
        }
        Ok(())
    }

    fn finish(&mut self, block: Block) -> io::Result<()> {
        let mut headers: Vec<(Vec<u8>, Vec<u8>, u8)> = Vec::new();
        let mut fragments = block.fragments.to_vec();
        let decoded = self.decoder.decode(&mut fragments, &mut headers);
        let refused = headers.iter().any(|(name, value, _)| name == b":authority" && !is_authority(value));
        if decoded.is_err() {
            if self.reencode {
                return Err(protocol("undecodable header block"));
            }
            // h2 finds the same error and ends the connection with the right code.
            self.out.unsplit(block.frames);
            self.mode = Mode::Plain;
            return Ok(());
        }
        self.reencode |= refused;
        if !self.reencode {
            self.out.unsplit(block.frames);
            return Ok(());
        }
        let mut encoded = BytesMut::new();
        for (name, value, _) in &headers {
            if name == b":authority" && !is_authority(value) {
                match authority_in(value) {
                    Some(fixed) => encode_literal(name, fixed, &mut encoded),
                    None => continue,
                }
            } else {
                encode_literal(name, value, &mut encoded);
            }
        }
        self.write_block(&block, encoded);
        Ok(())
    }

    /// Frames a re-encoded block: HEADERS (with the original END_STREAM and priority, without
    /// padding) and as many CONTINUATIONs as the frame size needs.
    fn write_block(&mut self, block: &Block, mut encoded: BytesMut) {
        let mut first = true;
        loop {
            let room = if first && block.priority.is_some() { MAX_FRAME - 5 } else { MAX_FRAME };
            let chunk = encoded.split_to(encoded.len().min(room));
            let last = encoded.is_empty();
            let mut flags = if last { END_HEADERS } else { 0 };
            let kind = if first { HEADERS } else { CONTINUATION };
            if first && block.end_stream {
                flags |= END_STREAM;
            }
            let priority = if first { block.priority } else { None };
            if priority.is_some() {
                flags |= PRIORITY;
            }
            let len = chunk.len() + priority.map_or(0, |p| p.len());
            self.out.reserve(9 + len);
            self.out.put_uint(len as u64, 3);
            self.out.put_u8(kind);
            self.out.put_u8(flags);
            self.out.put_u32(block.stream);
            if let Some(p) = priority {
                self.out.put_slice(&p);
            }
            self.out.unsplit(chunk);
            first = false;
            if last {
                return;
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for LenientAuthority<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out[..n]);
                this.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.mode == Mode::Plain && this.raw.is_empty() {
                return Pin::new(&mut this.io).poll_read(cx, buf);
            }
            if this.eof {
                // Whatever is left is an incomplete frame: hyper sees the stream end.
                return Poll::Ready(Ok(()));
            }
            this.raw.reserve(8 * 1024);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.io), cx, &mut this.raw) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(0)) => this.eof = true,
                Poll::Ready(Ok(_)) => {}
            }
            this.process()?;
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for LenientAuthority<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

fn protocol(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("HTTP/2 from the client: {what}"))
}

/// Whether h2 takes `value` as `:authority`.
fn is_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// The authority inside a URL-shaped value (`http://host:port/path` → `host:port`), if any.
fn authority_in(value: &[u8]) -> Option<&[u8]> {
    let text = std::str::from_utf8(value).ok()?;
    let rest = text.split_once("://").map_or(text, |(_, rest)| rest);
    let host = rest.split(['/', '?', '#']).next()?;
    (!host.is_empty() && is_authority(host.as_bytes())).then_some(host.as_bytes())
}

/// One header as an HPACK literal that never enters the dynamic table (RFC 7541 §6.2.2, new
/// name, no Huffman).
fn encode_literal(name: &[u8], value: &[u8], dst: &mut BytesMut) {
    dst.put_u8(0x00);
    for s in [name, value] {
        encode_integer(s.len(), 7, dst);
        dst.put_slice(s);
    }
}

/// An HPACK integer with an `prefix`-bit prefix, the other bits of the first byte zero (RFC 7541
/// §5.1).
fn encode_integer(mut n: usize, prefix: u8, dst: &mut BytesMut) {
    let max = (1usize << prefix) - 1;
    if n < max {
        dst.put_u8(n as u8);
        return;
    }
    dst.put_u8(max as u8);
    n -= max;
    while n >= 128 {
        dst.put_u8((n % 128) as u8 | 0x80);
        n /= 128;
    }
    dst.put_u8(n as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_h2_refuses_are_recognised_and_mended() {
        assert!(is_authority(b"127.0.0.1:2379"));
        assert!(is_authority(b"localhost"));
        assert!(!is_authority(b"http://127.0.0.1:2379"));
        assert!(!is_authority(b"#initially=[http://127.0.0.1:2379;http://127.0.0.1:22379]"));
        assert_eq!(authority_in(b"http://127.0.0.1:2379"), Some(&b"127.0.0.1:2379"[..]));
        assert_eq!(authority_in(b"https://node-1.example:2379/v3/kv"), Some(&b"node-1.example:2379"[..]));
        assert_eq!(authority_in(b"#initially=[http://127.0.0.1:2379;http://127.0.0.1:22379]"), None);
        assert_eq!(authority_in(b"http://"), None);
    }

    #[test]
    fn integers_encode_as_rfc_7541_shows() {
        // C.1.1, C.1.2 and C.1.3 of RFC 7541 (with the prefix's other bits zero).
        let mut b = BytesMut::new();
        encode_integer(10, 5, &mut b);
        assert_eq!(&b[..], [10]);
        b.clear();
        encode_integer(1337, 5, &mut b);
        assert_eq!(&b[..], [31, 154, 10]);
        b.clear();
        encode_integer(42, 8, &mut b);
        assert_eq!(&b[..], [42]);
    }

    #[test]
    fn a_literal_decodes_to_what_was_encoded() {
        let mut b = BytesMut::new();
        let long = vec![b'x'; 300];
        encode_literal(b":authority", b"host:1", &mut b);
        encode_literal(b"x-long", &long, &mut b);
        let mut decoded = Vec::new();
        httlib_hpack::Decoder::default().decode(&mut b.to_vec(), &mut decoded).expect("decodes");
        let decoded: Vec<(Vec<u8>, Vec<u8>)> = decoded.into_iter().map(|(n, v, _)| (n, v)).collect();
        assert_eq!(decoded, vec![(b":authority".to_vec(), b"host:1".to_vec()), (b"x-long".to_vec(), long)]);
    }
}
