//! The session log (`--log-sessions`): one line per finished TCP session, per expired UDP flow
//! and per refused client, in logfmt or JSON. Workers hand a [`Record`] to a bounded channel
//! and go on; a thread of its own formats and writes. When the channel is full the record is
//! dropped and counted (`tether_session_log_dropped_total`): a slow disk or a stopped reader
//! never blocks a worker.
//!
//! Keys, in order: `time` (RFC 3339, UTC, ms, when it ended), `protocol` (`tcp`, `udp`),
//! `service`, `client` (the real client: a trusted proxy's header says it), `backend`,
//! `backend_address` (`-` / null when none was chosen), `bytes_in` (from the client),
//! `bytes_out` (to the client), `duration_ms`, `end` (see [`End`]), `pinned` (the client had a
//! sticky pin when it came).

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::Snapshot;

/// Records waiting for the writer at most: about 20 MB of them.
pub const CAPACITY: usize = 65_536;

/// How a session or flow ended, or why a client was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client closed its side first, then the backend (both flushed).
    ClientFin,
    /// The backend closed its side first, then the client.
    BackendFin,
    /// The client reset (or its socket failed); the backend was reset after what the client
    /// sent had been forwarded.
    ClientReset,
    /// The backend reset (or its socket failed).
    BackendReset,
    /// Nothing moved either way for the idle timeout (a UDP flow's end, usually).
    IdleTimeout,
    /// Cut at the end of the shutdown grace period.
    Grace,
    /// No backend could take the client (all down, full or refusing).
    NoBackend,
    /// Its backend went down or into maintenance under `on-down kill`.
    BackendDown,
    /// An ACL refused the client (or a reload's ACL ended its flow).
    Denied,
    /// A limit refused the client: per-source connections or rate, or `--max-conns`.
    Limited,
    /// A UDP flow whose listener a reload removed.
    ListenerClosed,
    /// A UDP flow ended early to make room in a full flow table.
    Reclaimed,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::ClientFin => "client_fin",
            End::BackendFin => "backend_fin",
            End::ClientReset => "client_reset",
            End::BackendReset => "backend_reset",
            End::IdleTimeout => "idle_timeout",
            End::Grace => "grace",
            End::NoBackend => "no_backend",
            End::BackendDown => "backend_down",
            End::Denied => "denied",
            End::Limited => "limited",
            End::ListenerClosed => "listener_closed",
            End::Reclaimed => "reclaimed",
        }
    }
}

/// Lines as `key=value` pairs or one JSON object each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Logfmt,
    Json,
}

/// One finished session, expired flow or refused client.
#[derive(Debug)]
pub struct Record {
    pub at: SystemTime,
    pub udp: bool,
    /// The service's snapshot the session was routed by (names are read from it by the
    /// writer, off the data path). `None` for a connection that met no service.
    pub service: Option<Arc<Snapshot>>,
    pub client: SocketAddr,
    /// Index of the backend in `service.backends`, if one was chosen.
    pub backend: Option<usize>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration: Duration,
    pub end: End,
    pub pinned: bool,
}

impl Record {
    /// A client turned away before any backend was tried, or with none left.
    pub fn refused(
        udp: bool,
        service: Option<&Arc<Snapshot>>,
        client: SocketAddr,
        end: End,
    ) -> Record {
        Record {
            at: SystemTime::now(),
            udp,
            service: service.cloned(),
            client,
            backend: None,
            bytes_in: 0,
            bytes_out: 0,
            duration: Duration::ZERO,
            end,
            pinned: false,
        }
    }
}

/// The workers' end of the log: cheap to clone, never blocks.
#[derive(Debug)]
pub struct SessionLog {
    tx: Sender<Record>,
    /// Records dropped because the writer was behind.
    pub dropped: AtomicU64,
    /// Lines written.
    pub written: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl SessionLog {
    /// Starts the writer thread on `out`. Stop it with [`SessionLog::stop`] and join the handle
    /// to have every record taken so far written.
    pub fn start(
        format: Format,
        out: Box<dyn Write + Send>,
        capacity: usize,
    ) -> std::io::Result<(Arc<SessionLog>, std::thread::JoinHandle<()>)> {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        let written = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (w, s) = (Arc::clone(&written), Arc::clone(&stop));
        let handle = std::thread::Builder::new()
            .name("tether-sessionlog".into())
            .spawn(move || write_loop(&rx, format, out, &w, &s))?;
        Ok((Arc::new(SessionLog { tx, dropped: AtomicU64::new(0), written, stop }), handle))
    }

    /// Hand a record to the writer; counted as dropped if it is behind by [`CAPACITY`].
    pub fn log(&self, record: Record) {
        match self.tx.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Relaxed);
            }
        }
    }

    /// Ask the writer to write what it holds and end.
    pub fn stop(&self) {
        self.stop.store(true, Relaxed);
    }
}

fn write_loop(
    rx: &Receiver<Record>,
    format: Format,
    out: Box<dyn Write + Send>,
    written: &AtomicU64,
    stop: &AtomicBool,
) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut line = String::with_capacity(512);
    loop {
        let first = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(r) => Some(r),
            Err(_) if stop.load(Relaxed) => None,
            Err(_) => continue,
        };
        let Some(first) = first else { break };
        // Write what waits, then flush once: lines reach the reader within a batch.
        for record in std::iter::once(first).chain(rx.try_iter()) {
            line.clear();
            format_record(&record, format, &mut line);
            if let Err(e) = out.write_all(line.as_bytes()) {
                log::error!("session log: {e}; no more session lines");
                return;
            }
            written.fetch_add(1, Relaxed);
        }
        if let Err(e) = out.flush() {
            log::error!("session log: {e}; no more session lines");
            return;
        }
    }
    let _ = out.flush();
}

/// One line (with its newline) for `r`.
pub fn format_record(r: &Record, format: Format, out: &mut String) {
    use std::fmt::Write as _;
    let time = vocab::time::rfc3339_ms(r.at);
    let service = r.service.as_ref().map(|s| s.name.as_str());
    let backend = match (&r.service, r.backend) {
        (Some(s), Some(i)) => s.backends.get(i).map(|b| (b.name.as_str(), b.addr)),
        _ => None,
    };
    let protocol = if r.udp { "udp" } else { "tcp" };
    let duration_ms = r.duration.as_millis();
    match format {
        Format::Logfmt => {
            let _ = write!(out, "time={time} protocol={protocol} service=");
            logfmt_value(service.unwrap_or("-"), out);
            let _ = write!(out, " client={} backend=", r.client);
            logfmt_value(backend.map_or("-", |b| b.0), out);
            let address = backend.map_or_else(|| "-".to_string(), |b| b.1.to_string());
            let _ = writeln!(
                out,
                " backend_address={address} bytes_in={} bytes_out={} duration_ms={duration_ms} end={} pinned={}",
                r.bytes_in,
                r.bytes_out,
                r.end.as_str(),
                r.pinned
            );
        }
        Format::Json => {
            let _ = write!(out, "{{\"time\":\"{time}\",\"protocol\":\"{protocol}\",\"service\":");
            json_string_or_null(service, out);
            let _ = write!(out, ",\"client\":\"{}\",\"backend\":", r.client);
            json_string_or_null(backend.map(|b| b.0), out);
            let _ = write!(out, ",\"backend_address\":");
            json_string_or_null(backend.map(|b| b.1.to_string()).as_deref(), out);
            let _ = writeln!(
                out,
                ",\"bytes_in\":{},\"bytes_out\":{},\"duration_ms\":{duration_ms},\"end\":\"{}\",\"pinned\":{}}}",
                r.bytes_in,
                r.bytes_out,
                r.end.as_str(),
                r.pinned
            );
        }
    }
}

/// A logfmt value: bare when it is one plain word, else quoted like a JSON string.
fn logfmt_value(v: &str, out: &mut String) {
    let plain = !v.is_empty() && v.chars().all(|c| c.is_ascii_graphic() && c != '"' && c != '=');
    if plain {
        out.push_str(v);
    } else {
        quoted(v, out);
    }
}

fn json_string_or_null(v: Option<&str>, out: &mut String) {
    match v {
        Some(v) => quoted(v, out),
        None => out.push_str("null"),
    }
}

/// `v` in double quotes, `"` and `\` escaped and control characters as `\uXXXX` (JSON's
/// rules, which logfmt readers take too).
fn quoted(v: &str, out: &mut String) {
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(end: End) -> Record {
        Record {
            at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_986_812_345),
            udp: false,
            service: None,
            client: "127.0.0.7:40000".parse().expect("addr"),
            backend: None,
            bytes_in: 12,
            bytes_out: 3456,
            duration: Duration::from_micros(7_900),
            end,
            pinned: true,
        }
    }

    #[test]
    fn a_logfmt_line_has_every_key_in_order() {
        let mut s = String::new();
        format_record(&record(End::NoBackend), Format::Logfmt, &mut s);
        assert_eq!(
            s,
            "time=2026-11-29T21:13:32.345Z protocol=tcp service=- client=127.0.0.7:40000 \
             backend=- backend_address=- bytes_in=12 bytes_out=3456 duration_ms=7 \
             end=no_backend pinned=true\n"
        );
    }

    #[test]
    fn a_json_line_is_one_object() {
        let mut s = String::new();
        format_record(&record(End::Denied), Format::Json, &mut s);
        assert!(s.ends_with("}\n") && s.matches('\n').count() == 1, "{s}");
        assert!(s.contains("\"service\":null,\"client\":\"127.0.0.7:40000\",\"backend\":null"));
        assert!(s.contains("\"end\":\"denied\",\"pinned\":true}"), "{s}");
    }

    #[test]
    fn values_that_are_not_one_plain_word_are_quoted_and_escaped() {
        let mut s = String::new();
        logfmt_value("a b=\"c\"\n", &mut s);
        assert_eq!(s, "\"a b=\\\"c\\\"\\u000a\"");
        let mut j = String::new();
        json_string_or_null(Some("q\"\\\u{1}"), &mut j);
        assert_eq!(j, "\"q\\\"\\\\\\u0001\"");
    }

    #[test]
    fn a_full_channel_drops_and_counts_instead_of_blocking() {
        // A writer that never finishes its first write: the channel fills behind it.
        struct Stuck(std::sync::mpsc::Receiver<()>);
        impl Write for Stuck {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                let _ = self.0.recv();
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (release, rx) = std::sync::mpsc::channel();
        let (log, handle) =
            SessionLog::start(Format::Logfmt, Box::new(Stuck(rx)), 4).expect("start");
        let started = std::time::Instant::now();
        for _ in 0..1000 {
            log.log(record(End::ClientFin));
        }
        assert!(started.elapsed() < Duration::from_secs(5), "logging blocked");
        // Kept: at most the channel's 4, the lines the writer's buffer took before its first
        // (stuck) write, and the one being written.
        let mut line = String::new();
        format_record(&record(End::ClientFin), Format::Logfmt, &mut line);
        let kept = 1000 - log.dropped.load(Relaxed) as usize;
        assert!(kept <= 4 + 64 * 1024 / line.len() + 2, "kept {kept}");
        log.stop();
        drop(release);
        handle.join().expect("writer");
    }
}
