//! The load generator's HTTP/2 client: just enough HTTP/2 to keep many unary gRPC calls in
//! flight on one connection, with every request's header block encoded ahead of time.
//!
//! The load generator shares the machine with the server it measures, so what it spends per
//! request is taken from the server. A general-purpose client (h2) spends about as much per
//! request as the server's HTTP/2 stack does, most of it Huffman-coding the token again for
//! every request. Here the header blocks are the very bytes h2 produces for these requests
//! (recorded once from an in-memory h2 connection, [`record_header_blocks`]), so the server
//! decodes exactly what a ztunnel (tonic over h2) would send, and sending a request is copying
//! two frames. Responses are read in full: every header block is HPACK-decoded (the table must
//! follow the server's) and every answer's status, `grpc-status` and chain are checked.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Stream receive window we announce: far above one response.
const STREAM_WINDOW: u32 = 1 << 20;
/// Connection receive window we keep open.
const CONNECTION_WINDOW: u32 = 16 << 20;
/// The HPACK table size the recorded blocks assume (the protocol's default).
const TABLE_SIZE: u32 = 4096;

/// The requests of a run, encoded once.
pub struct Encoded {
    /// Header block of request 0 as the first request on a connection (it fills the HPACK
    /// table with the fields every request repeats).
    cold: Bytes,
    /// Header block of each request on a connection whose table holds those fields.
    warm: Vec<Bytes>,
    /// Each request's gRPC message, length-prefixed.
    bodies: Vec<Bytes>,
}

impl Encoded {
    /// Number of distinct requests.
    pub fn len(&self) -> usize {
        self.bodies.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.bodies.is_empty()
    }
}

/// Records the header blocks h2's client encodes for `requests` (request 0 first on a fresh
/// connection, then every request again) and pairs them with `bodies`.
pub async fn record_header_blocks(
    requests: &[http::Request<()>],
    bodies: Vec<Bytes>,
) -> Result<Encoded, String> {
    let first = requests.first().ok_or("no requests")?;
    let (client, mut server) = tokio::io::duplex(1 << 24);
    let (mut send, connection) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .handshake::<_, Bytes>(client)
        .await
        .map_err(|e| format!("recording header blocks: {e}"))?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut open = Vec::new();
    for r in std::iter::once(first).chain(requests) {
        let mut request = http::Request::new(());
        *request.method_mut() = r.method().clone();
        *request.uri_mut() = r.uri().clone();
        *request.headers_mut() = r.headers().clone();
        send = send
            .ready()
            .await
            .map_err(|e| format!("recording header blocks: {e}"))?;
        // Keep the streams open so nothing but their HEADERS frames is written.
        open.push(
            send.send_request(request, true)
                .map_err(|e| format!("recording header blocks: {e}"))?,
        );
    }
    let want = requests.len() + 1;
    let mut raw = BytesMut::new();
    let mut blocks = Vec::with_capacity(want);
    let mut preface_seen = false;
    while blocks.len() < want {
        if server
            .read_buf(&mut raw)
            .await
            .map_err(|e| format!("recording header blocks: {e}"))?
            == 0
        {
            return Err("recording header blocks: h2 closed the connection".into());
        }
        if !preface_seen {
            if raw.len() < PREFACE.len() {
                continue;
            }
            if &raw[..PREFACE.len()] != PREFACE {
                return Err("recording header blocks: no HTTP/2 preface".into());
            }
            raw.advance(PREFACE.len());
            preface_seen = true;
        }
        while let Some(f) = Frame::parse(&mut raw) {
            if f.kind == HEADERS {
                if f.flags & END_HEADERS == 0 || f.flags & (PADDED | PRIORITY) != 0 {
                    return Err("recording header blocks: unexpected HEADERS framing".into());
                }
                blocks.push(f.payload);
            }
        }
    }
    drop(open);
    driver.abort();
    let cold = blocks.remove(0);
    Ok(Encoded {
        cold,
        warm: blocks,
        bodies,
    })
}

struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Bytes,
}

impl Frame {
    /// Takes one whole frame off the front of `buf`, if there is one.
    fn parse(buf: &mut BytesMut) -> Option<Frame> {
        let head = buf.get(..9)?;
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        if buf.len() < 9 + len {
            return None;
        }
        let kind = head[3];
        let flags = head[4];
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        buf.advance(9);
        let payload = buf.split_to(len).freeze();
        Some(Frame {
            kind,
            flags,
            stream,
            payload,
        })
    }
}

fn put_frame(out: &mut BytesMut, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len();
    out.reserve(9 + len);
    // Frames written here are far below the 16 MiB a length can say.
    out.put_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.put_u32(stream);
    out.put_slice(payload);
}

/// What one connection did in a run.
#[derive(Default)]
pub struct Tally {
    /// Answers with HTTP 200, `grpc-status: 0` and a chain of at least two elements.
    pub ok: u64,
    /// Everything else, with requests lost when the connection failed.
    pub errors: u64,
    /// Latency of each good answer, µs.
    pub latencies_us: Vec<u64>,
    /// Why the connection failed, if it did.
    pub failure: Option<String>,
    /// The longest time between two good answers, µs: a stall of the server worker serving
    /// this connection shows here.
    pub longest_gap_us: u64,
    last_done: Option<Instant>,
}

/// One connection's share of a run.
pub struct Load {
    /// The requests.
    pub encoded: Arc<Encoded>,
    /// Index of this connection's first request; then every `stride`-th.
    pub first: usize,
    /// Step between this connection's requests.
    pub stride: usize,
    /// Requests kept in flight.
    pub in_flight: usize,
    /// Set when the run ends: no new requests, in-flight ones are finished.
    pub stop: Arc<AtomicBool>,
}

#[derive(Default)]
struct Stream {
    started: Option<Instant>,
    status: Option<u16>,
    grpc_status: Option<Vec<u8>>,
    body: Vec<u8>,
}

/// An HTTP/2 connection (after TLS) carrying the benchmark's requests.
pub struct Connection<S> {
    io: S,
    out: BytesMut,
    input: BytesMut,
    decoder: loona_hpack::Decoder<'static>,
    /// The cold header block has been sent (the server's HPACK table holds the shared fields).
    warm: bool,
    next_stream: u32,
    send_window: i64,
    peer_stream_window: i64,
    peer_max_streams: usize,
    unacknowledged: u32,
    streams: HashMap<u32, Stream>,
    /// A header block split over CONTINUATION frames: (stream, END_STREAM, block so far).
    partial: Option<(u32, bool, BytesMut)>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Starts HTTP/2 on `io` (preface, settings, a large connection window).
    pub async fn start(mut io: S) -> Result<Self, String> {
        let mut out = BytesMut::with_capacity(64 * 1024);
        out.put_slice(PREFACE);
        let mut settings = Vec::new();
        settings.extend_from_slice(&0x2u16.to_be_bytes()); // ENABLE_PUSH
        settings.extend_from_slice(&0u32.to_be_bytes());
        settings.extend_from_slice(&0x4u16.to_be_bytes()); // INITIAL_WINDOW_SIZE
        settings.extend_from_slice(&STREAM_WINDOW.to_be_bytes());
        put_frame(&mut out, SETTINGS, 0, 0, &settings);
        put_frame(
            &mut out,
            WINDOW_UPDATE,
            0,
            0,
            &(CONNECTION_WINDOW - 65_535).to_be_bytes(),
        );
        io.write_all(&out).await.map_err(|e| e.to_string())?;
        io.flush().await.map_err(|e| e.to_string())?;
        out.clear();
        Ok(Self {
            io,
            out,
            input: BytesMut::with_capacity(64 * 1024),
            decoder: loona_hpack::Decoder::new(),
            warm: false,
            next_stream: 1,
            send_window: 65_535,
            peer_stream_window: 65_535,
            peer_max_streams: usize::MAX,
            unacknowledged: 0,
            streams: HashMap::new(),
            partial: None,
        })
    }

    /// Keeps `load.in_flight` requests going until `load.stop` is set, then finishes the
    /// in-flight ones.
    pub async fn run(&mut self, load: &Load) -> Tally {
        let mut tally = Tally::default();
        if let Err(e) = self.run_inner(load, &mut tally).await {
            tally.errors += self.streams.len() as u64;
            self.streams.clear();
            tally.failure = Some(e);
        }
        tally
    }

    async fn run_inner(&mut self, load: &Load, tally: &mut Tally) -> Result<(), String> {
        let n = load.encoded.len();
        if load.encoded.is_empty() || load.in_flight == 0 {
            return Ok(());
        }
        let mut next = load.first;
        loop {
            let stopping = load.stop.load(Ordering::Relaxed);
            while !stopping && self.streams.len() < load.in_flight.min(self.peer_max_streams) {
                // The first request on a connection is request 0 with its cold block.
                let i = if self.warm { next % n } else { 0 };
                let body = &load.encoded.bodies[i];
                let len = body.len() as i64;
                if len > self.send_window {
                    break; // wait for WINDOW_UPDATE
                }
                if len > self.peer_stream_window {
                    return Err(format!(
                        "a request of {len} bytes exceeds the server's stream window"
                    ));
                }
                let id = self.next_stream;
                if id > 0x7fff_fff0 {
                    return Err("stream identifiers exhausted on this connection".into());
                }
                let block = if self.warm {
                    next += load.stride;
                    &load.encoded.warm[i]
                } else {
                    self.warm = true;
                    &load.encoded.cold
                };
                put_frame(&mut self.out, HEADERS, END_HEADERS, id, block);
                put_frame(&mut self.out, DATA, END_STREAM, id, body);
                self.send_window -= len;
                self.next_stream += 2;
                self.streams.insert(
                    id,
                    Stream {
                        started: Some(Instant::now()),
                        ..Stream::default()
                    },
                );
            }
            if !self.out.is_empty() {
                self.io
                    .write_all(&self.out)
                    .await
                    .map_err(|e| format!("send: {e}"))?;
                self.io.flush().await.map_err(|e| format!("send: {e}"))?;
                self.out.clear();
            }
            if self.streams.is_empty() && stopping {
                return Ok(());
            }
            self.input.reserve(32 * 1024);
            if self
                .io
                .read_buf(&mut self.input)
                .await
                .map_err(|e| format!("receive: {e}"))?
                == 0
            {
                return Err("the server closed the connection".into());
            }
            while let Some(f) = Frame::parse(&mut self.input) {
                self.on_frame(f, tally)?;
            }
            if self.unacknowledged >= CONNECTION_WINDOW / 2 {
                put_frame(
                    &mut self.out,
                    WINDOW_UPDATE,
                    0,
                    0,
                    &self.unacknowledged.to_be_bytes(),
                );
                self.unacknowledged = 0;
            }
        }
    }

    fn on_frame(&mut self, f: Frame, tally: &mut Tally) -> Result<(), String> {
        if let Some((stream, _, _)) = &self.partial
            && (f.kind != CONTINUATION || f.stream != *stream)
        {
            return Err("a header block was interrupted".into());
        }
        match f.kind {
            DATA => {
                self.unacknowledged = self.unacknowledged.saturating_add(f.payload.len() as u32);
                let data = unpad(&f)?;
                if let Some(s) = self.streams.get_mut(&f.stream) {
                    s.body.extend_from_slice(data);
                }
                if f.flags & END_STREAM != 0 {
                    self.finish(f.stream, tally);
                }
            }
            HEADERS => {
                let mut block = unpad(&f)?;
                if f.flags & PRIORITY != 0 {
                    block = block.get(5..).ok_or("short HEADERS frame")?;
                }
                let end_stream = f.flags & END_STREAM != 0;
                if f.flags & END_HEADERS == 0 {
                    self.partial = Some((f.stream, end_stream, BytesMut::from(block)));
                } else {
                    self.on_headers(f.stream, end_stream, block, tally)?;
                }
            }
            CONTINUATION => {
                let Some((stream, end_stream, mut block)) = self.partial.take() else {
                    return Err("CONTINUATION without HEADERS".into());
                };
                block.extend_from_slice(&f.payload);
                if f.flags & END_HEADERS == 0 {
                    self.partial = Some((stream, end_stream, block));
                } else {
                    self.on_headers(stream, end_stream, &block, tally)?;
                }
            }
            RST_STREAM if self.streams.remove(&f.stream).is_some() => tally.errors += 1,
            SETTINGS if f.flags & ACK == 0 => {
                for s in f.payload.chunks(6) {
                    let [a, b, v0, v1, v2, v3] = *s else {
                        return Err("malformed SETTINGS".into());
                    };
                    let value = u32::from_be_bytes([v0, v1, v2, v3]);
                    match u16::from_be_bytes([a, b]) {
                        0x1 if value < TABLE_SIZE => {
                            return Err(format!(
                                "the server's HPACK table ({value} bytes) is smaller than the \
                                 {TABLE_SIZE} the request header blocks were encoded for"
                            ));
                        }
                        0x3 => self.peer_max_streams = value as usize,
                        0x4 => {
                            self.peer_stream_window = i64::from(value);
                        }
                        _ => {}
                    }
                }
                put_frame(&mut self.out, SETTINGS, ACK, 0, &[]);
            }
            PING if f.flags & ACK == 0 => {
                put_frame(&mut self.out, PING, ACK, 0, &f.payload);
            }
            GOAWAY => {
                let code = f
                    .payload
                    .get(4..8)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
                return Err(format!("the server sent GOAWAY (error code {code:?})"));
            }
            WINDOW_UPDATE if f.stream == 0 => {
                let inc = f
                    .payload
                    .get(..4)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) & 0x7fff_ffff)
                    .ok_or("malformed WINDOW_UPDATE")?;
                self.send_window += i64::from(inc);
            }
            _ => {}
        }
        Ok(())
    }

    fn on_headers(
        &mut self,
        stream: u32,
        end_stream: bool,
        block: &[u8],
        tally: &mut Tally,
    ) -> Result<(), String> {
        let mut status = None;
        let mut grpc_status = None;
        // Every block is decoded, wanted or not: the table must follow the server's.
        self.decoder
            .decode_with_cb(block, |name, value| match &*name {
                b":status" => {
                    status = std::str::from_utf8(&value)
                        .ok()
                        .and_then(|v| v.parse().ok())
                }
                b"grpc-status" => grpc_status = Some(value.into_owned()),
                _ => {}
            })
            .map_err(|e| format!("HPACK: {e:?}"))?;
        if let Some(s) = self.streams.get_mut(&stream) {
            if s.status.is_none() {
                s.status = status;
            }
            if grpc_status.is_some() {
                s.grpc_status = grpc_status;
            }
        }
        if end_stream {
            self.finish(stream, tally);
        }
        Ok(())
    }

    fn finish(&mut self, stream: u32, tally: &mut Tally) {
        use prost::Message as _;
        let Some(s) = self.streams.remove(&stream) else {
            return;
        };
        let good = s.status == Some(200)
            && s.grpc_status.as_deref() == Some(b"0")
            && s.body
                .get(5..)
                .and_then(|m| crate::grpc::proto::IstioCertificateResponse::decode(m).ok())
                .is_some_and(|r| r.cert_chain.len() >= 2);
        if good {
            tally.ok += 1;
            let now = Instant::now();
            if let Some(t) = s.started {
                tally
                    .latencies_us
                    .push(now.duration_since(t).as_micros() as u64);
            }
            if let Some(last) = tally.last_done {
                let gap = now.duration_since(last).as_micros() as u64;
                tally.longest_gap_us = tally.longest_gap_us.max(gap);
            }
            tally.last_done = Some(now);
        } else {
            tracing::debug!(
                stream,
                status = ?s.status,
                grpc_status = ?s.grpc_status.as_deref().map(String::from_utf8_lossy),
                "bench request failed"
            );
            tally.errors += 1;
        }
    }
}

/// The payload of a DATA or HEADERS frame without its padding.
fn unpad(f: &Frame) -> Result<&[u8], String> {
    if f.flags & PADDED == 0 {
        return Ok(&f.payload);
    }
    let pad = usize::from(*f.payload.first().ok_or("empty padded frame")?);
    f.payload
        .get(1..f.payload.len().saturating_sub(pad))
        .filter(|_| pad < f.payload.len())
        .ok_or_else(|| "padding longer than the frame".into())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    use super::*;

    fn requests(n: usize) -> (Vec<http::Request<()>>, Vec<Bytes>) {
        let uri: http::Uri =
            "https://cactl.test/istio.v1.auth.IstioCertificateService/CreateCertificate"
                .parse()
                .unwrap();
        (0..n)
            .map(|i| {
                let mut r = http::Request::new(());
                *r.method_mut() = http::Method::POST;
                *r.uri_mut() = uri.clone();
                let h = r.headers_mut();
                h.insert(
                    "authorization",
                    format!("Bearer token-{i}-{}", "x".repeat(600))
                        .parse()
                        .unwrap(),
                );
                h.insert("clusterid", "east".parse().unwrap());
                h.insert("content-type", "application/grpc".parse().unwrap());
                h.insert("te", "trailers".parse().unwrap());
                (r, Bytes::from(format!("body-{i}")))
            })
            .unzip()
    }

    fn decoded(d: &mut loona_hpack::Decoder<'static>, block: &[u8]) -> Vec<(String, String)> {
        d.decode(block)
            .unwrap()
            .into_iter()
            .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
            .collect()
    }

    #[tokio::test]
    async fn recorded_blocks_decode_to_the_requests_in_order() {
        let (reqs, bodies) = requests(5);
        let enc = record_header_blocks(&reqs, bodies).await.unwrap();
        assert_eq!(enc.len(), 5);
        let mut d = loona_hpack::Decoder::new();
        let cold = decoded(&mut d, &enc.cold);
        assert!(cold.contains(&(":method".into(), "POST".into())));
        assert!(cold.contains(&(
            ":path".into(),
            "/istio.v1.auth.IstioCertificateService/CreateCertificate".into()
        )));
        assert!(cold.contains(&(
            "authorization".into(),
            format!("Bearer token-0-{}", "x".repeat(600))
        )));
        // After the cold block, each warm block decodes on its own table state to its request,
        // and is smaller: the repeated fields are table references.
        for (i, block) in enc.warm.iter().enumerate() {
            let fields = decoded(&mut d, block);
            assert!(fields.contains(&(
                "authorization".into(),
                format!("Bearer token-{i}-{}", "x".repeat(600))
            )));
            assert!(fields.contains(&("clusterid".into(), "east".into())));
            assert!(fields.contains(&(":authority".into(), "cactl.test".into())));
            assert!(block.len() < enc.cold.len());
        }
        // The token is Huffman-coded as h2 sends it: shorter than the text.
        assert!(enc.warm[0].len() < 600);
    }

    /// An h2 server that answers every request whose token and body agree, and fails every
    /// third with `grpc-status: 7` (trailers only).
    async fn serve(io: tokio::io::DuplexStream, seen: Arc<AtomicU64>) {
        use prost::Message as _;
        let mut conn = h2::server::handshake(io).await.unwrap();
        while let Some(Ok((req, mut respond))) = conn.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let token = req.headers()["authorization"].to_str().unwrap().to_owned();
                let mut body = req.into_body();
                let mut data = Vec::new();
                while let Some(c) = body.data().await {
                    let c = c.unwrap();
                    let _ = body.flow_control().release_capacity(c.len());
                    data.extend_from_slice(&c);
                }
                let i: usize = String::from_utf8(data).unwrap()[5..].parse().unwrap();
                assert!(token.starts_with(&format!("Bearer token-{i}-")), "{token}");
                let n = seen.fetch_add(1, Ordering::Relaxed);
                let head = http::Response::builder()
                    .status(200)
                    .header("content-type", "application/grpc");
                if n % 3 == 2 {
                    let r = head.header("grpc-status", "7").body(()).unwrap();
                    respond.send_response(r, true).unwrap();
                    return;
                }
                let mut send = respond
                    .send_response(head.body(()).unwrap(), false)
                    .unwrap();
                let msg = crate::grpc::proto::IstioCertificateResponse {
                    cert_chain: vec!["leaf".into(), "root".into()],
                }
                .encode_to_vec();
                let mut framed = vec![0];
                framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
                framed.extend_from_slice(&msg);
                send.send_data(framed.into(), false).unwrap();
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", "0".parse().unwrap());
                send.send_trailers(trailers).unwrap();
            });
        }
    }

    #[tokio::test]
    async fn a_run_counts_good_and_failed_answers_and_stops_cleanly() {
        let (reqs, bodies) = requests(7);
        // Request i's body names i, so the server can check it got i's token.
        let bodies = bodies
            .iter()
            .enumerate()
            .map(|(i, _)| Bytes::from(format!("00000{i}")))
            .collect();
        let enc = Arc::new(record_header_blocks(&reqs, bodies).await.unwrap());
        let (client, server) = tokio::io::duplex(1 << 20);
        let seen = Arc::new(AtomicU64::new(0));
        tokio::spawn(serve(server, seen.clone()));
        let mut conn = Connection::start(client).await.unwrap();
        for round in 0..2 {
            let stop = Arc::new(AtomicBool::new(false));
            let load = Load {
                encoded: enc.clone(),
                first: 3,
                stride: 2,
                in_flight: 5,
                stop: stop.clone(),
            };
            let before = seen.load(Ordering::Relaxed);
            let s = stop.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                s.store(true, Ordering::Relaxed);
            });
            let tally = conn.run(&load).await;
            assert!(
                tally.failure.is_none(),
                "round {round}: {:?}",
                tally.failure
            );
            let answered = seen.load(Ordering::Relaxed) - before;
            assert!(answered > 20, "round {round}: {answered}");
            assert_eq!(tally.ok + tally.errors, answered, "round {round}");
            assert_eq!(tally.latencies_us.len() as u64, tally.ok);
            // Every third answer overall was a failure.
            let failed = (before..before + answered).filter(|n| n % 3 == 2).count() as u64;
            assert_eq!(tally.errors, failed, "round {round}");
        }
    }
}
