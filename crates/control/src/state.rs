//! The state file (issue 12): every service's sticky table saved every `--state-interval` and
//! at a clean shutdown by a thread of its own, and loaded at start before any client is
//! accepted, so pins outlive a restart or a crash. The format is `conntrack::state`'s.
//!
//! A save collects each service's table and backend names under the registry lock (a few
//! `Arc` clones), then reads the tables without it (one shard lock at a time: workers never
//! wait on it), encodes, and writes a temporary file that is fsynced and renamed over the old
//! one, and fsyncs the directory: a crash at any instant leaves the old file or the new one.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use vocab::time::unix_ms;

use conntrack::state::{SavedEntry, SavedService, SavedState};
use conntrack::{AffinityKey, Sticky};
use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::registry::Registry;

/// What the state file's thread and the load at start count, for `/metrics` and `/api/state`.
#[derive(Debug, Default)]
pub struct Counters {
    /// The file (`None` without `--state-file`).
    pub file: std::sync::OnceLock<PathBuf>,
    /// When the last save finished (unix ms; 0: none yet).
    pub saved_unix_ms: AtomicU64,
    /// Entries and bytes of the last save.
    pub entries: AtomicU64,
    pub bytes: AtomicU64,
    /// How long the last save took, in microseconds.
    pub save_us: AtomicU64,
    /// Saves that failed (the old file stays).
    pub errors: AtomicU64,
    /// Entries restored at start, and entries skipped (backend gone, expired, no room).
    pub loaded: AtomicU64,
    pub skipped: AtomicU64,
}

/// One service's table as a save reads it.
struct Table {
    name: String,
    sticky: Arc<Sticky>,
    timeout_ms: u64,
    /// Backend id -> (index in `names`).
    index: HashMap<conntrack::BackendId, u16>,
    names: Vec<String>,
}

/// The tables of every service, taken under the lock.
fn tables(registry: &Mutex<Registry>) -> (Vec<Table>, Arc<Counters>, u64) {
    let reg = registry.lock().unwrap_or_else(|p| p.into_inner());
    let now_ms = reg.shared.clock_ms();
    let tables = reg
        .services
        .iter()
        .flatten()
        .map(|s| Table {
            name: s.config.name.clone(),
            sticky: Arc::clone(&s.sticky),
            timeout_ms: s.config.sticky_timeout.as_millis() as u64,
            index: s.backends.iter().enumerate().map(|(i, b)| (b.state.id, i as u16)).collect(),
            names: s.backends.iter().map(|b| b.state.name.clone()).collect(),
        })
        .collect();
    (tables, Arc::clone(&reg.state), now_ms)
}

/// Every sticky table in the state file's format, and how many pins it holds.
pub fn encode(registry: &Mutex<Registry>) -> (Vec<u8>, usize) {
    let (tables, _, now_ms) = tables(registry);
    encode_tables(tables, now_ms)
}

/// Save every sticky table to `path`. Returns the entries written.
pub fn save(registry: &Mutex<Registry>, path: &Path) -> std::io::Result<usize> {
    let started = Instant::now();
    let (tables, counters, now_ms) = tables(registry);
    let (bytes, entries) = encode_tables(tables, now_ms);
    write_atomically(path, &bytes)?;
    counters.saved_unix_ms.store(unix_ms(SystemTime::now()), Relaxed);
    counters.entries.store(entries as u64, Relaxed);
    counters.bytes.store(bytes.len() as u64, Relaxed);
    counters.save_us.store(started.elapsed().as_micros() as u64, Relaxed);
    Ok(entries)
}

fn encode_tables(tables: Vec<Table>, now_ms: u64) -> (Vec<u8>, usize) {
    let now_wall = unix_ms(SystemTime::now());
    let mut state = SavedState { saved_at_unix_ms: now_wall, services: Vec::new() };
    for t in tables {
        let entries = t
            .sticky
            .export(now_ms)
            .into_iter()
            .filter_map(|(key, id, left)| {
                // A pin to a backend the service no longer has is not worth keeping.
                let backend = *t.index.get(&id)?;
                let last_used_unix_ms = match left {
                    // Sessions are open: it is in use now.
                    None => now_wall,
                    // Idle: it was last used `timeout - left` ago.
                    Some(left) => now_wall.saturating_sub(t.timeout_ms.saturating_sub(left)),
                };
                Some(SavedEntry {
                    key: key.to_bytes(),
                    backend,
                    last_used_unix_ms,
                    live: left.is_none(),
                })
            })
            .collect();
        state.services.push(SavedService { name: t.name, backends: t.names, entries });
    }
    let entries: usize = state.services.iter().map(|s| s.entries.len()).sum();
    (state.encode(), entries)
}

/// Write `bytes` to `path` so that a crash leaves the old file or the new one: a temporary
/// file beside it, fsynced, renamed over it, and the directory fsynced (rename(2), fsync(2)).
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = tmp_path(path);
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

/// Whether tether can write the state file: a temporary file beside it is created and removed.
/// Checked at start (before privileges are dropped too, so a file only root could write is
/// found out later, by the first save), so that a path in a missing or read-only directory
/// stops tether with the reason instead of failing every save.
pub fn check_writable(path: &Path) -> std::io::Result<()> {
    let probe = tmp_path(path);
    std::fs::File::create(&probe)?;
    std::fs::remove_file(&probe)
}

/// PATH.tmp: where a save writes before the rename.
fn tmp_path(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    PathBuf::from(tmp)
}

/// Restore the pins saved in `path` into the registry's tables, before any client is
/// accepted. A missing file is a first start; an unreadable, torn, corrupted or foreign one is
/// logged in one line and skipped whole; an entry whose service or backend is gone, or whose
/// sticky timeout has passed, is skipped alone. Never fails.
pub fn load(registry: &Registry, path: &Path) {
    let _ = registry.state.file.set(path.to_path_buf());
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            log::info!("state file {}: none yet, starting without saved pins", path.display());
            return;
        }
        Err(e) => {
            log::warn!(
                "state file {}: not read ({e}); starting without saved pins",
                path.display()
            );
            return;
        }
    };
    restore(registry, &bytes, &format!("state file {}", path.display()));
}

/// Restore the pins in `bytes` (the state file's format) into the registry's tables; `from`
/// names where they came from in the log line.
pub fn restore(registry: &Registry, bytes: &[u8], from: &str) {
    let started = Instant::now();
    let (state, mut skipped) = match SavedState::decode(bytes) {
        Ok(read) => read,
        Err(e) => {
            log::warn!("{from}: ignored, {e}; starting without saved pins");
            return;
        }
    };
    let now_wall = unix_ms(SystemTime::now());
    let now_ms = registry.shared.clock_ms();
    let mut loaded = 0;
    for saved in &state.services {
        let Some(service) =
            registry.services.iter().flatten().find(|s| s.config.name == saved.name)
        else {
            skipped += saved.entries.len();
            continue;
        };
        let ids: HashMap<&str, conntrack::BackendId> =
            service.backends.iter().map(|b| (b.state.name.as_str(), b.state.id)).collect();
        let timeout_ms = service.config.sticky_timeout.as_millis() as u64;
        for e in &saved.entries {
            let id = ids.get(saved.backends[usize::from(e.backend)].as_str());
            let expires = e.last_used_unix_ms.saturating_add(timeout_ms);
            let left = expires.saturating_sub(now_wall);
            let key = AffinityKey::from_bytes(e.key);
            match id {
                Some(&id) if service.sticky.restore(key, id, left, now_ms) => loaded += 1,
                _ => skipped += 1,
            }
        }
    }
    registry.state.loaded.store(loaded as u64, Relaxed);
    registry.state.skipped.store(skipped as u64, Relaxed);
    let age = Duration::from_millis(now_wall.saturating_sub(state.saved_at_unix_ms));
    log::info!(
        "{from}: {loaded} pins restored, {skipped} skipped (saved {age:?} ago; read in {:?})",
        started.elapsed()
    );
}

/// Save every `interval` until `stop` sends or disconnects. A failed save is logged (on the
/// 1st, 2nd, 4th... failure in a row) and counted; the old file stays.
pub fn spawn(
    registry: Arc<Mutex<Registry>>,
    path: PathBuf,
    interval: Duration,
    stop: Receiver<()>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("tether-state".into()).spawn(move || {
        let mut failed = 0u64;
        loop {
            match stop.recv_timeout(interval) {
                Err(RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            }
            match save(&registry, &path) {
                Ok(n) => {
                    if failed > 0 {
                        log::info!("state file {}: saved again ({n} pins)", path.display());
                    }
                    failed = 0;
                }
                Err(e) => {
                    failed += 1;
                    let reg = registry.lock().unwrap_or_else(|p| p.into_inner());
                    reg.state.errors.fetch_add(1, Relaxed);
                    if failed.is_power_of_two() {
                        log::warn!(
                            "state file {}: save failed ({failed} in a row): {e}",
                            path.display()
                        );
                    }
                }
            }
        }
    })
}
