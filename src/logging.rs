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
//!
//! [`JsonFormat`] writes each event as one JSON object straight into the line, with no
//! intermediate values: the general-purpose JSON formatter serialises through serde and formats
//! most field values twice, which cost the signing path as much as the rest of its logging.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer as LineWriter;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

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
