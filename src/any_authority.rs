//! A connection layer that lets h2 accept any HTTP/2 `:authority`.
//!
//! Why it exists: grpc-go clients that dial a unix socket through a custom
//! dialer (kubelet and crictl 1.26 to 1.30, among others) send the socket
//! path, `/run/hoist/hoist.sock`, as `:authority`. h2 parses the authority as
//! a URI authority, fails, and resets every stream with PROTOCOL_ERROR before
//! tonic sees the request; h2 has no setting to relax that. grpc-go servers
//! (containerd, CRI-O) ignore the authority, and so must hoist.
//!
//! How: this layer sits between the socket and h2 and reads the client's
//! frames. Every request header block (HEADERS plus CONTINUATION) is decoded
//! with the client's HPACK state, an authority that is not a valid URI
//! authority becomes `localhost`, and the block is re-encoded with literals
//! that never touch h2's dynamic table. The client's encoder and this
//! decoder stay in step (the client may refer to an earlier `:authority` by
//! dynamic index, as grpc-go does), and h2's decoder table stays empty, so
//! the two sides can never disagree. Every other frame passes unchanged;
//! the server-to-client direction is untouched.

use bytes::{Buf, BufMut, BytesMut};
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What an authority that h2 would refuse becomes.
const REPLACEMENT: &[u8] = b"localhost";

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The smallest SETTINGS_MAX_FRAME_SIZE a peer may set: frames this layer
/// writes never exceed it, whatever h2 was configured with.
const MAX_FRAME_PAYLOAD: usize = 16_384;
/// A request's header block larger than this closes the connection (no CRI
/// client comes near it; it bounds what a CONTINUATION flood can buffer).
const MAX_HEADER_BLOCK: usize = 1 << 20;
/// h2 never announces SETTINGS_HEADER_TABLE_SIZE, so a client's HPACK
/// encoder may use the protocol default and no more.
const MAX_TABLE_SIZE: usize = 4096;

/// A server-side connection whose request headers h2 accepts whatever
/// `:authority` the client sent. Writes pass straight through.
pub struct AnyAuthority<S> {
    inner: S,
    /// Bytes read from the client and not yet processed.
    input: BytesMut,
    /// Bytes ready for h2.
    output: BytesMut,
    state: State,
    /// Bytes of a non-header frame's payload still to pass through.
    passing: usize,
    block: Option<PendingBlock>,
    hpack: Decoder,
    eof: bool,
}

enum State {
    Preface,
    Frames,
    /// Not HTTP/2 with prior knowledge: h2 will refuse it; pass it unchanged.
    Opaque,
}

/// A header block whose CONTINUATION frames are still arriving.
struct PendingBlock {
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

impl<S> AnyAuthority<S> {
    pub fn new(inner: S) -> Self {
        AnyAuthority {
            inner,
            input: BytesMut::with_capacity(8192),
            output: BytesMut::new(),
            state: State::Preface,
            passing: 0,
            block: None,
            hpack: Decoder::default(),
            eof: false,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Moves whatever `input` allows to `output`.
    fn process(&mut self) -> io::Result<()> {
        loop {
            match self.state {
                State::Opaque => {
                    let all = self.input.split();
                    self.output.extend_from_slice(&all);
                    return Ok(());
                }
                State::Preface => {
                    let n = self.input.len().min(PREFACE.len());
                    if self.input[..n] != PREFACE[..n] {
                        self.state = State::Opaque;
                        continue;
                    }
                    if n < PREFACE.len() {
                        return Ok(());
                    }
                    let preface = self.input.split_to(n);
                    self.output.extend_from_slice(&preface);
                    self.state = State::Frames;
                }
                State::Frames => {
                    if self.passing > 0 {
                        let n = self.passing.min(self.input.len());
                        let bytes = self.input.split_to(n);
                        self.output.extend_from_slice(&bytes);
                        self.passing -= n;
                        if self.passing > 0 {
                            return Ok(());
                        }
                    }
                    if self.input.len() < FRAME_HEADER {
                        return Ok(());
                    }
                    let len = u32::from_be_bytes([0, self.input[0], self.input[1], self.input[2]])
                        as usize;
                    let kind = self.input[3];
                    if kind != HEADERS && (kind != CONTINUATION || self.block.is_none()) {
                        if self.block.is_some() {
                            return Err(invalid(
                                "a frame other than CONTINUATION inside a header block",
                            ));
                        }
                        let header = self.input.split_to(FRAME_HEADER);
                        self.output.extend_from_slice(&header);
                        self.passing = len;
                        continue;
                    }
                    if len > MAX_HEADER_BLOCK {
                        return Err(invalid("header frame too large"));
                    }
                    if self.input.len() < FRAME_HEADER + len {
                        return Ok(());
                    }
                    let mut frame = self.input.split_to(FRAME_HEADER + len);
                    let flags = frame[4];
                    let stream =
                        u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
                    frame.advance(FRAME_HEADER);
                    self.header_frame(kind, flags, stream, &frame)?;
                }
            }
        }
    }

    fn header_frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) -> io::Result<()> {
        let fragment = if kind == HEADERS {
            if self.block.is_some() {
                return Err(invalid("HEADERS inside a header block"));
            }
            let mut payload = payload;
            let mut pad = 0;
            if flags & PADDED != 0 {
                let (&n, rest) = payload
                    .split_first()
                    .ok_or_else(|| invalid("padded HEADERS without a pad length"))?;
                pad = n as usize;
                payload = rest;
            }
            let mut priority = None;
            if flags & PRIORITY != 0 {
                let (fields, rest) = payload
                    .split_first_chunk::<5>()
                    .ok_or_else(|| invalid("HEADERS too short for its priority"))?;
                priority = Some(*fields);
                payload = rest;
            }
            let body = payload
                .len()
                .checked_sub(pad)
                .ok_or_else(|| invalid("HEADERS padding longer than the frame"))?;
            self.block = Some(PendingBlock {
                stream,
                flags,
                priority,
                fragment: Vec::new(),
            });
            &payload[..body]
        } else {
            payload
        };
        let Some(block) = self.block.as_mut() else {
            return Err(invalid("CONTINUATION without HEADERS"));
        };
        if block.stream != stream {
            return Err(invalid("CONTINUATION on another stream"));
        }
        if block.fragment.len() + fragment.len() > MAX_HEADER_BLOCK {
            return Err(invalid("header block too large"));
        }
        block.fragment.extend_from_slice(fragment);
        if flags & END_HEADERS == 0 {
            return Ok(());
        }
        let Some(block) = self.block.take() else {
            return Ok(());
        };
        let fields = self.hpack.decode(&block.fragment)?;
        let encoded = encode(fields);
        write_headers(&mut self.output, &block, &encoded);
        Ok(())
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("HTTP/2 from the client: {what}"),
    )
}

/// Re-encodes `fields` as literals without indexing with literal names:
/// h2's decoder adds nothing to its table. An authority h2 would refuse is
/// replaced; a valid one is kept.
fn encode(fields: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        let value = if name == b":authority" && http::uri::Authority::try_from(&value[..]).is_err()
        {
            REPLACEMENT.to_vec()
        } else {
            value
        };
        out.push(0);
        put_int(&mut out, 0, 7, name.len());
        out.extend_from_slice(&name);
        put_int(&mut out, 0, 7, value.len());
        out.extend_from_slice(&value);
    }
    out
}

/// HPACK integer with an N-bit prefix (RFC 7541 5.1).
fn put_int(out: &mut Vec<u8>, first: u8, prefix: u8, value: usize) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// HEADERS then CONTINUATION frames carrying `encoded`, with the original
/// END_STREAM and priority, no padding.
fn write_headers(out: &mut BytesMut, block: &PendingBlock, encoded: &[u8]) {
    let priority = block.priority.as_ref().map_or(&[][..], |p| &p[..]);
    let first = encoded.len().min(MAX_FRAME_PAYLOAD - priority.len());
    let (head, mut rest) = encoded.split_at(first);
    let mut flags = block.flags & (END_STREAM | PRIORITY);
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    frame_header(
        out,
        priority.len() + head.len(),
        HEADERS,
        flags,
        block.stream,
    );
    out.extend_from_slice(priority);
    out.extend_from_slice(head);
    while !rest.is_empty() {
        let n = rest.len().min(MAX_FRAME_PAYLOAD);
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        let flags = if rest.is_empty() { END_HEADERS } else { 0 };
        frame_header(out, n, CONTINUATION, flags, block.stream);
        out.extend_from_slice(chunk);
    }
}

fn frame_header(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    out.put_slice(&(len as u32).to_be_bytes()[1..]);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream);
}

/// The HPACK decoder state of one connection (RFC 7541): the client's
/// dynamic table, mirrored.
struct Decoder {
    table: VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    max_size: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max_size: MAX_TABLE_SIZE,
        }
    }
}

impl Decoder {
    fn decode(&mut self, mut block: &[u8]) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut fields = Vec::new();
        while let Some(&first) = block.first() {
            if first & 0x80 != 0 {
                let index = take_int(&mut block, 7)?;
                fields.push(self.entry(index)?.clone());
            } else if first & 0xe0 == 0x20 {
                // A table size update: only before the first field.
                if !fields.is_empty() {
                    return Err(hpack("table size update after a field"));
                }
                let size = take_int(&mut block, 5)?;
                if size > MAX_TABLE_SIZE {
                    return Err(hpack("table size update beyond the limit"));
                }
                self.max_size = size;
                self.evict(0);
            } else {
                let (prefix, indexing) = if first & 0x40 != 0 {
                    (6, true)
                } else {
                    (4, false)
                };
                let index = take_int(&mut block, prefix)?;
                let name = if index == 0 {
                    take_string(&mut block)?
                } else {
                    self.entry(index)?.0.clone()
                };
                let value = take_string(&mut block)?;
                if indexing {
                    self.insert(name.clone(), value.clone());
                }
                fields.push((name, value));
            }
        }
        Ok(fields)
    }

    fn entry(&self, index: usize) -> io::Result<(Vec<u8>, Vec<u8>)> {
        match index {
            0 => Err(hpack("index 0")),
            i if i <= STATIC_TABLE.len() => {
                let (name, value) = STATIC_TABLE[i - 1];
                Ok((name.as_bytes().to_vec(), value.as_bytes().to_vec()))
            }
            i => self
                .table
                .get(i - STATIC_TABLE.len() - 1)
                .cloned()
                .ok_or_else(|| hpack("index beyond the dynamic table")),
        }
    }

    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let size = name.len() + value.len() + 32;
        if size > self.max_size {
            // An entry larger than the table empties it (RFC 7541 4.4).
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict(size);
        self.size += size;
        self.table.push_front((name, value));
    }

    /// Evicts the oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max_size {
            let Some((name, value)) = self.table.pop_back() else {
                self.size = 0;
                return;
            };
            self.size -= name.len() + value.len() + 32;
        }
    }
}

fn hpack(what: &str) -> io::Error {
    invalid(&format!("HPACK: {what}"))
}

/// An integer with an N-bit prefix; bounded so that it cannot overflow.
fn take_int(block: &mut &[u8], prefix: u8) -> io::Result<usize> {
    let (&first, mut rest) = block
        .split_first()
        .ok_or_else(|| hpack("truncated integer"))?;
    let max = (1usize << prefix) - 1;
    let mut value = first as usize & max;
    if value == max {
        let mut shift = 0;
        loop {
            let (&byte, tail) = rest
                .split_first()
                .ok_or_else(|| hpack("truncated integer"))?;
            rest = tail;
            if shift > 21 {
                return Err(hpack("integer too large"));
            }
            value += ((byte & 0x7f) as usize) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
        }
    }
    *block = rest;
    Ok(value)
}

fn take_string(block: &mut &[u8]) -> io::Result<Vec<u8>> {
    let huffman = block.first().is_some_and(|b| b & 0x80 != 0);
    let len = take_int(block, 7)?;
    if len > block.len() {
        return Err(hpack("truncated string"));
    }
    let (raw, rest) = block.split_at(len);
    *block = rest;
    if huffman {
        loona_hpack::huffman::HuffmanDecoder::new()
            .decode(raw)
            .map_err(|e| hpack(&format!("Huffman string: {e:?}")))
    } else {
        Ok(raw.to_vec())
    }
}

/// RFC 7541 Appendix A.
const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

impl<S: AsyncRead + Unpin> AsyncRead for AnyAuthority<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // A truncated frame goes to h2 as it came: h2 reports it.
                let rest = this.input.split();
                if rest.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                this.output.extend_from_slice(&rest);
                continue;
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                this.eof = true;
            }
            this.input.extend_from_slice(read.filled());
            this.process()?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AnyAuthority<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for AnyAuthority<tokio::net::UnixStream> {
    type ConnectInfo = tonic::transport::server::UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
#[path = "any_authority_tests.rs"]
mod tests;
