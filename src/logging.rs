//! Log lines, batched per thread where a thread asks for it.
//!
//! `cactl serve` logs every certificate it issues. Handing each line to the log writer thread
//! on its own costs a channel message and, whenever that thread has gone to sleep, a wake-up:
//! under load that was more than formatting the line. A signing worker therefore collects its
//! lines in a thread-local buffer and hands them over together: when the buffer is full, when
//! the worker runs out of work (its runtime's park hook), at least every
//! [`FLUSH_INTERVAL`], and when the worker ends. A line is never split and lines from one
//! thread keep their order; threads that did not ask for batching hand each line over at once.
//! A process killed without warning can lose at most one interval of a worker's lines.

use std::cell::RefCell;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// Longest a batched line waits while its worker stays busy.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// A batch is handed over once it holds this much.
const BATCH_BYTES: usize = 16 * 1024;

/// Where lines end up: the log writer thread, or anything else in tests.
pub type Sink = Arc<dyn Fn(&[u8]) -> io::Result<()> + Send + Sync>;

/// The `MakeWriter` for the log subscriber.
#[derive(Clone)]
pub struct Writer {
    sink: Sink,
}

impl Writer {
    /// Lines go to `sink`, batched on threads that called [`batch_this_thread`].
    pub fn new(sink: Sink) -> Self {
        Self { sink }
    }
}

impl<'a> MakeWriter<'a> for Writer {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line {
            sink: self.sink.clone(),
        }
    }
}

/// Writes one formatted line (the subscriber writes each event with one `write_all`).
pub struct Line {
    sink: Sink,
}

impl io::Write for Line {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let full = BATCH.try_with(|b| {
            let mut b = b.borrow_mut();
            let batch = b.as_mut()?;
            batch.buf.extend_from_slice(buf);
            if batch.sink.is_none() {
                batch.sink = Some(self.sink.clone());
            }
            Some(batch.buf.len() >= BATCH_BYTES)
        });
        match full {
            Ok(Some(full)) => {
                if full {
                    flush_this_thread();
                }
                Ok(buf.len())
            }
            // Not batching, or the thread is ending: straight to the sink.
            _ => (self.sink)(buf).map(|()| buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Batch {
    buf: Vec<u8>,
    sink: Option<Sink>,
}

thread_local! {
    static BATCH: RefCell<Option<Batch>> = const { RefCell::new(None) };
}

/// Batches this thread's log lines until the returned guard is dropped (which hands over
/// what is left).
#[must_use = "batching ends when the guard is dropped"]
pub fn batch_this_thread() -> BatchGuard {
    let _ = BATCH.try_with(|b| {
        *b.borrow_mut() = Some(Batch {
            buf: Vec::with_capacity(BATCH_BYTES + 1024),
            sink: None,
        });
    });
    BatchGuard(())
}

/// Hands this thread's batched lines to the sink. Cheap when there are none.
pub fn flush_this_thread() {
    let taken = BATCH.try_with(|b| {
        let mut b = b.borrow_mut();
        let batch = b.as_mut()?;
        if batch.buf.is_empty() {
            return None;
        }
        let sink = batch.sink.clone()?;
        let lines = std::mem::replace(&mut batch.buf, Vec::with_capacity(BATCH_BYTES + 1024));
        Some((sink, lines))
    });
    if let Ok(Some((sink, lines))) = taken {
        // Nowhere to report a failed log write but the log itself.
        let _ = sink(&lines);
    }
}

/// Ends batching on this thread when dropped, handing over what is left.
pub struct BatchGuard(());

impl Drop for BatchGuard {
    fn drop(&mut self) {
        flush_this_thread();
        let _ = BATCH.try_with(|b| b.borrow_mut().take());
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::sync::Mutex;

    use super::*;

    fn recorder() -> (Writer, Arc<Mutex<Vec<Vec<u8>>>>) {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        let sink: Sink = Arc::new(move |b: &[u8]| {
            g.lock()
                .map_err(|_| io::Error::other("poisoned"))?
                .push(b.to_vec());
            Ok(())
        });
        (Writer::new(sink), got)
    }

    fn handed(got: &Arc<Mutex<Vec<Vec<u8>>>>) -> Vec<Vec<u8>> {
        got.lock().map(|g| g.clone()).unwrap_or_default()
    }

    #[test]
    fn lines_pass_straight_through_without_batching() {
        let (w, got) = recorder();
        w.make_writer().write_all(b"one\n").unwrap();
        w.make_writer().write_all(b"two\n").unwrap();
        assert_eq!(handed(&got), vec![b"one\n".to_vec(), b"two\n".to_vec()]);
    }

    #[test]
    fn batched_lines_wait_for_a_flush_and_keep_their_order() {
        std::thread::spawn(|| {
            let (w, got) = recorder();
            let guard = batch_this_thread();
            w.make_writer().write_all(b"one\n").unwrap();
            w.make_writer().write_all(b"two\n").unwrap();
            assert!(handed(&got).is_empty());
            flush_this_thread();
            assert_eq!(handed(&got), vec![b"one\ntwo\n".to_vec()]);
            flush_this_thread();
            assert_eq!(handed(&got).len(), 1, "an empty batch is not handed over");
            w.make_writer().write_all(b"three\n").unwrap();
            drop(guard);
            assert_eq!(handed(&got)[1], b"three\n".to_vec());
            // Batching has ended: the next line goes at once.
            w.make_writer().write_all(b"four\n").unwrap();
            assert_eq!(handed(&got)[2], b"four\n".to_vec());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_full_batch_is_handed_over_whole_lines_only() {
        std::thread::spawn(|| {
            let (w, got) = recorder();
            let _guard = batch_this_thread();
            let line = [b'x'; 999];
            let mut line = line.to_vec();
            line.push(b'\n');
            for _ in 0..17 {
                w.make_writer().write_all(&line).unwrap();
            }
            let h = handed(&got);
            assert_eq!(h.len(), 1, "handed over when 16 KiB had collected");
            assert_eq!(h[0].len(), 17 * 1000);
            assert!(h[0].chunks(1000).all(|c| c == line.as_slice()));
        })
        .join()
        .unwrap();
    }
}
