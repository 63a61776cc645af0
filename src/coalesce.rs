//! Write coalescing for the signing service's connections.
//!
//! h2 keeps at most one large DATA frame queued for writing, so every response of a few
//! kilobytes makes it flush on its own, and every flush went straight through TLS to the socket:
//! one `writev` per certificate, with all the loopback or NIC work that comes with it.
//! [`Coalesced`] sits between TLS and the TCP socket: writes land in a buffer, and a flush only
//! asks a companion task to write that buffer out. The companion runs after the tasks that are
//! already queued on the worker, so the responses of every stream that finishes in one pass of
//! the scheduler leave in one system call. Errors and back-pressure are passed back to the
//! writer: a failed write fails the next write or flush, and a full buffer makes writes wait.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Notify;

/// How much may wait in the buffer before writes wait for the companion task.
const MAX_PENDING: usize = 256 * 1024;

/// A TCP connection whose writes are coalesced (see the module documentation).
pub struct Coalesced {
    read: OwnedReadHalf,
    shared: Arc<Shared>,
    local: Option<SocketAddr>,
    remote: Option<SocketAddr>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the companion task.
    flush: Notify,
    /// Tells the companion the connection is closing (holds a permit once it is).
    closed: Notify,
}

#[derive(Default)]
struct State {
    /// Bytes written and not yet sent.
    pending: Vec<u8>,
    /// Why the companion stopped writing, if it did.
    failed: Option<(io::ErrorKind, String)>,
    /// The connection's task, waiting for room in the buffer or for the shutdown.
    writer: Option<Waker>,
    /// Shutdown asked: send what is pending, then shut the write side.
    closing: bool,
    /// The write side is shut.
    closed: bool,
}

impl Coalesced {
    /// Wraps `tcp` and starts its companion task on the current runtime.
    pub fn new(tcp: TcpStream) -> Self {
        let local = tcp.local_addr().ok();
        let remote = tcp.peer_addr().ok();
        let (read, write) = tcp.into_split();
        let shared = Arc::new(Shared::default());
        tokio::spawn(companion(write, shared.clone()));
        Self {
            read,
            shared,
            local,
            remote,
        }
    }
}

impl std::fmt::Debug for Coalesced {
    // Addresses only: the buffered bytes are the connection's traffic.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalesced")
            .field("local", &self.local)
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

impl Drop for Coalesced {
    fn drop(&mut self) {
        // Let the companion send what is left, shut the write side and end.
        self.shared.lock().closing = true;
        self.shared.flush.notify_one();
        self.shared.closed.notify_one();
    }
}

/// How long a closing connection may take to send what it has left.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves only byte buffers behind; keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    fn error(&self) -> Option<io::Error> {
        self.failed
            .as_ref()
            .map(|(kind, msg)| io::Error::new(*kind, msg.clone()))
    }
}

/// Writes out what the connection buffered, each time it is asked to, until the connection
/// shuts down or a write fails.
async fn companion(mut write: OwnedWriteHalf, shared: Arc<Shared>) {
    let mut out = Vec::new();
    loop {
        let (closing, waker) = {
            let mut st = shared.lock();
            std::mem::swap(&mut out, &mut st.pending);
            (st.closing, st.writer.take())
        };
        if out.is_empty() {
            if closing {
                let _ = write.shutdown().await;
                let waker = {
                    let mut st = shared.lock();
                    st.closed = true;
                    st.writer.take()
                };
                if let Some(w) = waker {
                    w.wake();
                }
                return;
            }
            if let Some(w) = waker {
                w.wake();
            }
            shared.flush.notified().await;
            continue;
        }
        // Room in the buffer again: let a waiting writer go on while this is written.
        if let Some(w) = waker {
            w.wake();
        }
        // A peer that stops reading holds this write; once the connection is closing it gets
        // CLOSE_TIMEOUT more, so a closed connection never keeps its companion for good.
        let written = tokio::select! {
            r = write.write_all(&out) => r,
            () = async {
                shared.closed.notified().await;
                tokio::time::sleep(CLOSE_TIMEOUT).await;
            } => Err(io::ErrorKind::TimedOut.into()),
        };
        if let Err(e) = written {
            let waker = {
                let mut st = shared.lock();
                st.failed = Some((e.kind(), e.to_string()));
                st.pending = Vec::new();
                st.closed = true;
                st.writer.take()
            };
            if let Some(w) = waker {
                w.wake();
            }
            return;
        }
        out.clear();
    }
}

impl AsyncRead for Coalesced {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for Coalesced {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut st = self.shared.lock();
        if let Some(e) = st.error() {
            return Poll::Ready(Err(e));
        }
        if st.closing || st.closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if st.pending.len() >= MAX_PENDING {
            st.writer = Some(cx.waker().clone());
            drop(st);
            self.shared.flush.notify_one();
            return Poll::Pending;
        }
        let mut n = 0;
        for b in bufs {
            st.pending.extend_from_slice(b);
            n += b.len();
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let st = self.shared.lock();
        if let Some(e) = st.error() {
            return Poll::Ready(Err(e));
        }
        let any = !st.pending.is_empty();
        drop(st);
        if any {
            // Sent when the companion runs: after the tasks already queued on this worker.
            self.shared.flush.notify_one();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = self.shared.lock();
        if st.closed {
            return Poll::Ready(st.error().map_or(Ok(()), Err));
        }
        let first = !st.closing;
        st.closing = true;
        st.writer = Some(cx.waker().clone());
        drop(st);
        self.shared.flush.notify_one();
        if first {
            self.shared.closed.notify_one();
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt as _;

    use super::*;

    async fn pair() -> (Coalesced, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (Coalesced::new(server), client)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn writes_are_held_until_flushed_and_then_sent_together() {
        let (mut server, mut client) = pair().await;
        // Let the companion start and wait for work, as it does on a busy connection.
        tokio::task::yield_now().await;
        server.write_all(b"one,").await.unwrap();
        server.write_all(b"two,").await.unwrap();
        // Nothing is sent before a flush, even when the worker has time to spare.
        tokio::task::yield_now().await;
        let mut buf = [0u8; 64];
        let early =
            tokio::time::timeout(std::time::Duration::from_millis(50), client.read(&mut buf)).await;
        assert!(
            early.is_err(),
            "bytes left before the flush: {early:?} {:?}",
            &buf[..8]
        );
        server.flush().await.unwrap();
        let mut got = Vec::new();
        while got.len() < 8 {
            let n = client.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"one,two,");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn shutdown_sends_everything_then_closes() {
        let (mut server, mut client) = pair().await;
        let big: Vec<u8> = (0..3 * MAX_PENDING).map(|i| (i % 251) as u8).collect();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        // More than the buffer holds: writes wait for the companion instead of growing it.
        server.write_all(&big).await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(reader.await.unwrap(), big);
        // Writing after shutdown is an error, not a silent drop.
        assert!(server.write_all(b"late").await.is_err());
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_peer_that_never_reads_does_not_hold_a_closed_connection() {
        let (mut server, client) = pair().await;
        let shared = server.shared.clone();
        // Fill the socket buffers and ours: the peer reads nothing.
        let chunk = vec![7u8; 64 * 1024];
        loop {
            let write =
                tokio::time::timeout(std::time::Duration::from_secs(1), server.write_all(&chunk));
            if write.await.is_err() {
                break;
            }
        }
        drop(server);
        tokio::time::sleep(CLOSE_TIMEOUT + std::time::Duration::from_secs(1)).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(
            shared.lock().closed,
            "the companion still holds the connection"
        );
        drop(client);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn reads_pass_through() {
        let (mut server, mut client) = pair().await;
        client.write_all(b"request").await.unwrap();
        let mut buf = [0u8; 7];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"request");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_write_fails_the_writer() {
        let (mut server, client) = pair().await;
        drop(client);
        // The peer is gone: sooner or later a write or flush reports it.
        let chunk = vec![0u8; 64 * 1024];
        let mut failed = false;
        for _ in 0..200 {
            if server.write_all(&chunk).await.is_err() || server.flush().await.is_err() {
                failed = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(failed, "writes to a closed peer never failed");
    }
}
