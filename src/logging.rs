//! Log lines, batched per thread where a thread asks for it, and the thread that writes them.
//!
//! `cactl serve` logs every certificate it issues. Handing each line to the log writer thread
//! on its own costs a channel message and, whenever that thread has gone to sleep, a wake-up:
//! under load that was more than formatting the line. A signing worker therefore collects its
//! lines in a thread-local buffer and hands them over together: when the buffer is full, when
//! the worker runs out of work (its runtime's park hook), at least every
//! [`FLUSH_INTERVAL`], and when the worker ends. A line is never split and lines from one
//! thread keep their order; threads that did not ask for batching hand each line over at once.
//!
//! The writer thread ([`Output`]) is not woken for each batch either. Each wake-up put a
//! runnable thread on a CPU a signing worker was using, and the workers' time waiting for a
//! CPU, not the writer's few microseconds of work, was what widened the latency tail. While
//! lines keep arriving the writer collects them on its own timer, every [`DRAIN_INTERVAL`],
//! and writes them in one go; a batch wakes it only when it has gone idle (nothing arrived
//! since its last write), so workers cause at most one wake-up per interval. A line from a
//! thread that does not batch, a large backlog and shutdown wake it early. So a batch reaches
//! the output within one interval plus the write before it, unless the output itself blocks;
//! a process killed without warning loses what was not yet written, at most about
//! [`FLUSH_INTERVAL`] plus [`DRAIN_INTERVAL`] of a worker's lines. Nothing is dropped
//! otherwise: when the writer falls far behind, loggers wait for it. Only once the writer has
//! stopped are lines refused, and shutdown waits at most [`SHUTDOWN_WAIT`] for an output that
//! does not take them.
//!
//! [`JsonFormat`] writes each event as one JSON object straight into the line, with no
//! intermediate values: the general-purpose JSON formatter serialises through serde and formats
//! most field values twice, which cost the signing path as much as the rest of its logging.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer as LineWriter;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

/// Longest a batched line waits while its worker stays busy.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// How often the writer thread takes the lines handed over while lines keep arriving.
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(20);

/// Longest dropping an [`Output`] waits for the writer to finish.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// A batch is handed over once it holds this much.
const BATCH_BYTES: usize = 16 * 1024;

/// Lines waiting for the writer above which it is woken early.
const DRAIN_EARLY_BYTES: usize = 1024 * 1024;

/// Lines waiting for the writer above which a hand-off waits for room.
const MAX_PENDING_BYTES: usize = 8 * 1024 * 1024;

/// Where lines end up: the log writer thread ([`Output::sink`]), or anything else in tests.
pub type Sink = Arc<dyn Fn(&[u8], Handoff) -> io::Result<()> + Send + Sync>;

/// Whether a hand-off wakes the writer thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handoff {
    /// A line from a thread that does not batch: written promptly.
    Now,
    /// A worker's batch: taken on the writer's own schedule, every [`DRAIN_INTERVAL`].
    Batch,
}

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
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line { sink: &self.sink }
    }
}

/// Writes one formatted line (the subscriber writes each event with one `write_all`).
pub struct Line<'a> {
    sink: &'a Sink,
}

impl io::Write for Line<'_> {
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
            _ => (self.sink)(buf, Handoff::Now).map(|()| buf.len()),
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
        let _ = sink(&lines, Handoff::Batch);
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

/// The log writer thread: takes the lines handed to its [`sink`](Self::sink) and writes them
/// to its output in large writes. Dropping it writes what is left and stops the thread,
/// waiting at most [`SHUTDOWN_WAIT`] for the output.
pub struct Output {
    queue: Arc<Queue>,
    thread: Option<JoinHandle<()>>,
}

impl Output {
    /// Starts the writer thread (`cactl-log`) writing to `out`, collecting lines for up to
    /// `interval` while they keep arriving.
    pub fn start(out: impl io::Write + Send + 'static, interval: Duration) -> io::Result<Self> {
        let queue = Arc::new(Queue {
            pending: Mutex::new(Pending {
                lines: Vec::new(),
                idle: false,
                wanted: false,
                closed: false,
                stopped: false,
            }),
            wake: Condvar::new(),
            room: Condvar::new(),
        });
        let q = queue.clone();
        let thread = std::thread::Builder::new()
            .name("cactl-log".into())
            .spawn(move || write_lines(&q, out, interval))?;
        Ok(Self {
            queue,
            thread: Some(thread),
        })
    }

    /// Where the log lines go: a hand-off into this writer's queue.
    pub fn sink(&self) -> Sink {
        let queue = self.queue.clone();
        Arc::new(move |lines: &[u8], handoff: Handoff| queue.push(lines, handoff))
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        let mut p = self.queue.lock();
        p.closed = true;
        self.queue.wake.notify_all();
        let (p, _) = match self
            .queue
            .room
            .wait_timeout_while(p, SHUTDOWN_WAIT, |p| !p.stopped)
        {
            Ok(r) => r,
            Err(e) => e.into_inner(),
        };
        let stopped = p.stopped;
        drop(p);
        // An output that never takes the lines (a pipe nobody reads) must not keep the process
        // from exiting: the thread is left behind.
        if let Some(thread) = self.thread.take()
            && stopped
        {
            let _ = thread.join();
        }
    }
}

/// Lines handed over and not yet taken by the writer.
struct Queue {
    pending: Mutex<Pending>,
    /// The writer waits here, for lines or for its interval to pass.
    wake: Condvar,
    /// Hand-offs wait here while the queue is full, and shutdown for the writer to stop.
    room: Condvar,
}

struct Pending {
    lines: Vec<u8>,
    /// The writer is waiting for lines with no timeout: the next hand-off wakes it.
    idle: bool,
    /// The writer should take the lines now rather than at the end of its interval.
    wanted: bool,
    /// The writer takes what is left and stops.
    closed: bool,
    /// The writer has stopped: hand-offs fail.
    stopped: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A thread that panicked while holding the lock left whole lines behind: every
        // change to `Pending` is a single append, swap or flag store.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, lines: &[u8], handoff: Handoff) -> io::Result<()> {
        let mut p = self.lock();
        while p.lines.len() >= MAX_PENDING_BYTES && !p.stopped {
            p.wanted = true;
            self.wake.notify_one();
            p = self.room.wait(p).unwrap_or_else(PoisonError::into_inner);
        }
        if p.stopped {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the log writer has stopped",
            ));
        }
        p.lines.extend_from_slice(lines);
        let wanted = handoff == Handoff::Now || p.lines.len() >= DRAIN_EARLY_BYTES;
        if wanted || p.idle {
            p.wanted |= wanted;
            p.idle = false;
            drop(p);
            self.wake.notify_one();
        }
        Ok(())
    }
}

/// The writer thread's loop: wait for lines, let more gather for up to `interval` unless they
/// are wanted now, write them in one go; when closed, write what is left and return.
fn write_lines(queue: &Queue, mut out: impl io::Write, interval: Duration) {
    // Marks the writer stopped however it ends, so no logger and no shutdown waits for it.
    struct Stopped<'a>(&'a Queue);
    impl Drop for Stopped<'_> {
        fn drop(&mut self) {
            self.0.lock().stopped = true;
            self.0.room.notify_all();
        }
    }
    let _stopped = Stopped(queue);
    let mut taken = Vec::new();
    let mut p = queue.lock();
    loop {
        if p.lines.is_empty() {
            if p.closed {
                // Refuse hand-offs from here on, in the same critical section that saw the
                // queue empty, so none is accepted and then left unwritten.
                p.stopped = true;
                break;
            }
            p.idle = true;
            p = queue
                .wake
                .wait_while(p, |p| p.idle && !p.closed)
                .unwrap_or_else(PoisonError::into_inner);
            continue;
        }
        if !p.wanted && !p.closed {
            p = match queue
                .wake
                .wait_timeout_while(p, interval, |p| !p.wanted && !p.closed)
            {
                Ok((p, _)) => p,
                Err(e) => e.into_inner().0,
            };
        }
        p.wanted = false;
        std::mem::swap(&mut p.lines, &mut taken);
        drop(p);
        queue.room.notify_all();
        // Nowhere to report a failed log write but the log itself; going on keeps the
        // loggers from waiting for room that never comes.
        let _ = out.write_all(&taken).and_then(|()| out.flush());
        taken.clear();
        // A burst's buffers are not kept for good.
        taken.shrink_to(DRAIN_EARLY_BYTES);
        p = queue.lock();
    }
    drop(p);
    let _ = out.flush();
}

/// Formats events as JSON lines: `timestamp` (RFC 3339, UTC, microseconds), `level`, the
/// event's fields (`message` first), `target`, and the enclosing spans, if any, as `spans`
/// (outermost first, each with `name` and its formatted `fields`).
#[derive(Clone, Copy, Debug, Default)]
pub struct JsonFormat;

impl<S, N> FormatEvent<S, N> for JsonFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: LineWriter<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        w.write_str("{\"timestamp\":\"")?;
        write_timestamp(&mut w, std::time::SystemTime::now())?;
        write!(w, "\",\"level\":\"{}\"", meta.level())?;
        let mut fields = JsonFields {
            w: &mut w,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        w.write_str(",\"target\":")?;
        json_str(&mut w, meta.target())?;
        if let Some(scope) = ctx.event_scope() {
            let mut first = true;
            for span in scope.from_root() {
                w.write_str(if first { ",\"spans\":[" } else { "," })?;
                first = false;
                w.write_str("{\"name\":")?;
                json_str(&mut w, span.name())?;
                let ext = span.extensions();
                if let Some(f) = ext.get::<FormattedFields<N>>()
                    && !f.is_empty()
                {
                    w.write_str(",\"fields\":")?;
                    json_str(&mut w, f)?;
                }
                w.write_str("}")?;
            }
            if !first {
                w.write_str("]")?;
            }
        }
        w.write_str("}\n")
    }
}

/// Writes `time` as RFC 3339 in UTC with microseconds; the part up to the second is kept per
/// thread and rewritten only when the second changes.
fn write_timestamp(w: &mut impl fmt::Write, time: std::time::SystemTime) -> fmt::Result {
    thread_local! {
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let since = time
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let micros = since.subsec_micros();
    let written = SECOND.try_with(|s| {
        let mut s = s.borrow_mut();
        if s.0 != secs {
            s.1.clear();
            let t = i64::try_from(secs)
                .ok()
                .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
            let _ = write!(
                s.1,
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            );
            s.0 = secs;
        }
        write!(w, "{}.{micros:06}Z", s.1)
    });
    written.unwrap_or_else(|_| write!(w, "{secs}.{micros:06}"))
}

/// Writes each field as `,"name":value`: numbers and booleans bare, everything else a string.
struct JsonFields<'a, 'w> {
    w: &'a mut LineWriter<'w>,
    result: fmt::Result,
}

impl JsonFields<'_, '_> {
    fn entry(&mut self, field: &Field, value: impl FnOnce(&mut LineWriter<'_>) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = self
                .w
                .write_str(",")
                .and_then(|()| json_str(self.w, field.name()))
                .and_then(|()| self.w.write_str(":"))
                .and_then(|()| value(self.w));
        }
    }
}

impl Visit for JsonFields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.entry(field, |w| json_str(w, value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.entry(field, |w| write!(w, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.entry(field, |w| write!(w, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.entry(field, |w| write!(w, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if value.is_finite() {
            self.entry(field, |w| write!(w, "{value}"));
        } else {
            self.entry(field, |w| write!(w, "\"{value}\""));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.entry(field, |w| {
            w.write_str("\"")?;
            write!(Escaped(&mut *w), "{value}")?;
            w.write_str("\"")
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.entry(field, |w| {
            w.write_str("\"")?;
            write!(Escaped(&mut *w), "{value:?}")?;
            w.write_str("\"")
        });
    }
}

fn json_str(w: &mut impl fmt::Write, s: &str) -> fmt::Result {
    w.write_str("\"")?;
    Escaped(&mut *w).write_str(s)?;
    w.write_str("\"")
}

/// Escapes what passes through for the inside of a JSON string.
struct Escaped<W>(W);

impl<W: fmt::Write> fmt::Write for Escaped<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut plain = 0;
        for (i, b) in s.bytes().enumerate() {
            let escape = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..=0x1f => "",
                _ => continue,
            };
            // `i` is at an ASCII byte, so both slices end on character boundaries.
            self.0.write_str(&s[plain..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            plain = i + 1;
        }
        self.0.write_str(&s[plain..])
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
        let sink: Sink = Arc::new(move |b: &[u8], _| {
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

    /// An output that records each write and can be held shut, to stand in for a pipe nobody
    /// reads.
    #[derive(Clone, Default)]
    struct Recorded {
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
        shut: Arc<(Mutex<bool>, std::sync::Condvar)>,
        entered: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Recorded {
        fn writes(&self) -> Vec<Vec<u8>> {
            self.writes.lock().map(|w| w.clone()).unwrap_or_default()
        }

        fn all(&self) -> Vec<u8> {
            self.writes().concat()
        }

        fn hold(&self, shut: bool) {
            *self.shut.0.lock().unwrap() = shut;
            self.shut.1.notify_all();
        }
    }

    impl io::Write for Recorded {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.entered
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (lock, open) = &*self.shut;
            let _open = open.wait_while(lock.lock().unwrap(), |shut| *shut).unwrap();
            self.writes.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn wait_for(what: impl Fn() -> bool) -> bool {
        let until = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < until {
            if what() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// An output held shut and a writer (10 ms interval) blocked writing `first` to it.
    fn writer_stuck_on(first: &[u8]) -> (Recorded, Output) {
        let rec = Recorded::default();
        rec.hold(true);
        let out = Output::start(rec.clone(), Duration::from_millis(10)).unwrap();
        out.sink()(first, Handoff::Now).unwrap();
        let entered = || rec.entered.load(std::sync::atomic::Ordering::SeqCst) == 1;
        assert!(wait_for(entered), "the writer took the first line");
        (rec, out)
    }

    /// A 1 KiB line of `fill`.
    fn kib_line(fill: u8) -> Vec<u8> {
        let mut line = vec![fill; 1023];
        line.push(b'\n');
        line
    }

    #[test]
    fn a_batch_waits_for_the_writers_interval_and_a_prompt_line_takes_it_along() {
        let rec = Recorded::default();
        let out = Output::start(rec.clone(), Duration::from_secs(3600)).unwrap();
        let sink = out.sink();
        sink(b"batch one\n", Handoff::Batch).unwrap();
        sink(b"batch two\n", Handoff::Batch).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            rec.writes().is_empty(),
            "a batch does not make the writer write"
        );
        sink(b"prompt\n", Handoff::Now).unwrap();
        assert!(
            wait_for(|| !rec.writes().is_empty()),
            "a prompt line is written at once"
        );
        assert_eq!(
            rec.writes(),
            vec![b"batch one\nbatch two\nprompt\n".to_vec()]
        );
        drop(out);
    }

    #[test]
    fn batches_are_written_on_the_writers_timer_not_one_write_each() {
        let rec = Recorded::default();
        let out = Output::start(rec.clone(), Duration::from_millis(50)).unwrap();
        let sink = out.sink();
        let started = std::time::Instant::now();
        let mut expected = Vec::new();
        for i in 0..200 {
            let line = format!("line {i}\n");
            sink(line.as_bytes(), Handoff::Batch).unwrap();
            expected.extend_from_slice(line.as_bytes());
            std::thread::sleep(Duration::from_millis(2));
        }
        let elapsed = started.elapsed();
        assert!(
            wait_for(|| rec.all().len() == expected.len()),
            "written within the interval"
        );
        // One write per interval at most while lines keep coming (plus the first and last).
        let most = elapsed.as_millis() / 50 + 2;
        let writes = rec.writes().len();
        assert!(writes as u128 <= most, "{writes} writes in {elapsed:?}");
        assert!(writes > 1, "lines are written while they keep coming");
        assert_eq!(rec.all(), expected);
        drop(out);
    }

    #[test]
    fn dropping_the_output_writes_what_is_left_and_later_lines_are_refused() {
        let rec = Recorded::default();
        let out = Output::start(rec.clone(), Duration::from_secs(30)).unwrap();
        let sink = out.sink();
        sink(b"one\n", Handoff::Batch).unwrap();
        sink(b"two\n", Handoff::Batch).unwrap();
        let started = std::time::Instant::now();
        drop(out);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no wait for the interval"
        );
        assert_eq!(rec.all(), b"one\ntwo\n");
        let e = sink(b"three\n", Handoff::Now).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn a_full_queue_makes_loggers_wait_and_loses_nothing() {
        let (rec, out) = writer_stuck_on(b"first\n");
        let sink = out.sink();
        let line = kib_line(b'y');
        let n = MAX_PENDING_BYTES / line.len() + 64;
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let s = sink.clone();
        let l = line.clone();
        let logger = std::thread::spawn(move || {
            for _ in 0..n {
                s(&l, Handoff::Batch).unwrap();
            }
            done_tx.send(()).unwrap();
        });
        assert!(
            done_rx.recv_timeout(Duration::from_millis(500)).is_err(),
            "the logger waits while the queue is full"
        );
        rec.hold(false);
        done_rx.recv_timeout(Duration::from_secs(60)).unwrap();
        logger.join().unwrap();
        drop(out);
        let all = rec.all();
        assert_eq!(&all[..6], b"first\n");
        assert_eq!(all.len(), 6 + n * line.len());
        assert!(all[6..].chunks(line.len()).all(|c| c == line.as_slice()));
    }

    #[test]
    fn a_large_backlog_wakes_the_writer_early() {
        let rec = Recorded::default();
        let out = Output::start(rec.clone(), Duration::from_secs(3600)).unwrap();
        let sink = out.sink();
        let line = kib_line(b'b');
        for _ in 0..DRAIN_EARLY_BYTES / line.len() - 1 {
            sink(&line, Handoff::Batch).unwrap();
        }
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            rec.writes().is_empty(),
            "under 1 MiB waits for the interval"
        );
        sink(&line, Handoff::Batch).unwrap();
        assert!(
            wait_for(|| rec.all().len() == DRAIN_EARLY_BYTES),
            "1 MiB is written at once"
        );
        drop(out);
    }

    #[test]
    fn lines_handed_over_during_shutdown_are_written() {
        let (rec, out) = writer_stuck_on(b"first\n");
        let sink = out.sink();
        let line = kib_line(b'z');
        let n = MAX_PENDING_BYTES / line.len() + 64;
        let (s, l) = (sink.clone(), line.clone());
        // This logger fills the queue and waits for room while the output is shut down.
        let logger = std::thread::spawn(move || {
            for _ in 0..n {
                s(&l, Handoff::Batch).unwrap();
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !logger.is_finished(),
            "more than the queue holds is waiting"
        );
        let closer = std::thread::spawn(move || drop(out));
        std::thread::sleep(Duration::from_millis(100));
        rec.hold(false);
        closer.join().unwrap();
        logger.join().unwrap();
        let all = rec.all();
        assert_eq!(all.len(), 6 + n * line.len(), "nothing handed over is lost");
        let late = sink(b"late\n", Handoff::Now).unwrap_err();
        assert_eq!(late.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn shutdown_gives_up_on_an_output_that_never_takes_lines() {
        let (rec, out) = writer_stuck_on(b"stuck\n");
        let started = std::time::Instant::now();
        drop(out);
        let waited = started.elapsed();
        assert!(
            waited >= SHUTDOWN_WAIT && waited < SHUTDOWN_WAIT + Duration::from_secs(20),
            "{waited:?}"
        );
        // Let the thread left behind finish.
        rec.hold(false);
    }

    #[test]
    fn worker_batches_reach_the_output_in_order() {
        let rec = Recorded::default();
        let out = Output::start(rec.clone(), Duration::from_millis(10)).unwrap();
        let w = Writer::new(out.sink());
        std::thread::spawn(move || {
            let _guard = batch_this_thread();
            for i in 0..2000 {
                writeln!(w.make_writer(), "line {i:04} {}", "z".repeat(40)).unwrap();
            }
        })
        .join()
        .unwrap();
        drop(out);
        let text = String::from_utf8(rec.all()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2000);
        for (i, l) in lines.iter().enumerate() {
            assert!(l.starts_with(&format!("line {i:04} ")), "{l}");
        }
    }

    #[test]
    fn json_lines_carry_every_field_escaped_and_typed() {
        let (w, got) = recorder();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(w)
            .with_ansi(false)
            .event_format(JsonFormat)
            .with_max_level(tracing::Level::INFO)
            .finish();
        let serial = "7f3a";
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(
                cluster = %"east",
                identity = "spiffe://cluster.local/ns/a/sa/b",
                serial = %serial,
                ttl_secs = 86400i64,
                big = u64::MAX,
                clamped = false,
                ratio = 0.5f64,
                odd = "quote \" backslash \\ newline \n tab \t bell \u{7} é",
                "issued workload certificate"
            );
            let span = tracing::info_span!("rotation", cluster = "west");
            let _in = span.enter();
            tracing::warn!("inside");
        });
        let lines = handed(&got);
        assert_eq!(lines.len(), 2);
        let text = String::from_utf8(lines[0].clone()).unwrap();
        assert!(text.ends_with("}\n"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["message"], "issued workload certificate");
        assert_eq!(v["cluster"], "east");
        assert_eq!(v["identity"], "spiffe://cluster.local/ns/a/sa/b");
        assert_eq!(v["serial"], "7f3a");
        assert_eq!(v["ttl_secs"], 86400);
        assert_eq!(v["big"], u64::MAX);
        assert_eq!(v["clamped"], false);
        assert_eq!(v["ratio"], 0.5);
        assert_eq!(
            v["odd"],
            "quote \" backslash \\ newline \n tab \t bell \u{7} é"
        );
        assert_eq!(v["target"], module_path!());
        assert!(v.get("spans").is_none());
        let ts = v["timestamp"].as_str().unwrap();
        let parsed =
            time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
                .unwrap();
        let now = time::OffsetDateTime::now_utc();
        assert!((now - parsed).abs() < time::Duration::seconds(60), "{ts}");
        assert_eq!(ts.len(), "2026-12-01T04:45:00.123456Z".len(), "{ts}");

        let v: serde_json::Value = serde_json::from_slice(&lines[1]).unwrap();
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["spans"][0]["name"], "rotation");
        assert_eq!(v["spans"][0]["fields"], "cluster=\"west\"");
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let mut s = String::new();
        let t = std::time::UNIX_EPOCH + Duration::from_micros(1_764_563_100_000_042);
        write_timestamp(&mut s, t).unwrap();
        assert_eq!(s, "2025-12-01T04:25:00.000042Z");
        // The cached second is replaced when the second changes.
        s.clear();
        write_timestamp(&mut s, t + Duration::from_secs(61)).unwrap();
        assert_eq!(s, "2025-12-01T04:26:01.000042Z");
    }
}
