//! The admin HTTP interface: JSON API, Prometheus metrics and the status page, on a thread of
//! its own, off the data path: it answers while the workers are saturated, and a slow admin
//! client never delays a datagram. Every change goes through the [`Registry`] mutex
//! ([`api`] holds the endpoints).
//!
//! The server is hyper's HTTP/1 on a current-thread tokio runtime that lives on the admin thread
//! alone; no async runtime enters the data plane. hyper gives the parts a crate does well (head
//! parsing with a size cap, a header read timeout, keep-alive, chunked bodies); this module
//! bounds what a client can take, so that no client can exhaust or stop the admin side and the
//! admin side can never take what the data path needs (issue 10):
//!
//! - connections: at most [`Limits::max_conns`] at once, counted in the fd budget tether sizes
//!   at start ([`fds`]); past the cap a new connection is closed at once and counted;
//! - the request head: at most [`MAX_HEAD`] bytes (hyper answers 431 past it) within
//!   [`Limits::timeout`], which on a keep-alive connection also bounds the wait for the next
//!   request (hyper starts the header timer when it begins to read a head);
//! - the body: at most [`MAX_BODY`] bytes within the same timeout;
//! - a connection on which no byte moves for the timeout while no request is being handled
//!   (a client that stops reading its answer) is closed;
//! - accept errors (EMFILE, ENFILE, ENOBUFS, ENOMEM) are logged and retried after a back-off;
//!   nothing ends the accept loop but shutdown (tiny_http, used before, stopped for good on the
//!   first one);
//! - handlers (they take the registry lock, and a reload waits for the supervisor) run on at
//!   most [`MAX_IN_FLIGHT`] blocking threads; past that a request is answered 503 at once.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::registry::Registry;

mod api;

/// Largest request head (request line and headers) read; hyper answers 431 past it. The API's
/// heads are a few hundred bytes; browsers send a few KiB.
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest request body accepted (the API's bodies are a few dozen bytes).
pub const MAX_BODY: usize = 16 * 1024;
/// Requests handled at once, each on a blocking thread; past this many, 503 at once.
pub const MAX_IN_FLIGHT: usize = 16;
/// How long a stopping admin server finishes the answers under way.
const DRAIN: Duration = Duration::from_secs(2);
/// Descriptors of the admin side besides its connections: the listener, the runtime's epoll
/// and its waker, and one connection accepted past the cap on its way to being closed.
const BASE_FDS: u64 = 4;
/// First and longest wait before accepting again after an accept error that a retry at once
/// would only repeat (out of descriptors or memory): nginx waits 500 ms.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What one admin client may take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once.
    pub max_conns: usize,
    /// For the request head (and the idle wait before it), and then for the body.
    pub timeout: Duration,
}

/// Descriptors the admin side may hold at most with `limits`: kept out of the session budget.
pub fn fds(limits: &Limits) -> u64 {
    limits.max_conns as u64 + BASE_FDS
}

/// What the admin side counts, for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections open now.
    pub open: AtomicU64,
    /// Connections closed at once because `max_conns` were open.
    pub refused: AtomicU64,
    /// accept(2) failures.
    pub accept_errors: AtomicU64,
    /// Connections closed for a head, body or idle wait past the timeout, or a peer that
    /// stopped reading.
    pub timeouts: AtomicU64,
}

/// What the admin thread asks of the supervisor.
#[derive(Debug)]
pub enum Ask {
    /// Reload the config file; the answer comes back on the channel.
    Reload(crossbeam_channel::Sender<Result<String, crate::reload::ReloadError>>),
    /// Upgrade to the binary at this one's path; the answer comes back on the channel.
    Upgrade(crossbeam_channel::Sender<Result<String, String>>),
}

/// The admin listener, bound (before privileges are dropped) but not yet serving.
pub struct Bound(std::net::TcpListener, SocketAddr);

/// Bind the admin address.
pub fn bind(addr: SocketAddr) -> Result<Bound, String> {
    let fail = |e: io::Error| format!("--admin {addr}: {e}");
    let listener = std::net::TcpListener::bind(addr).map_err(fail)?;
    adopt(listener).map_err(fail)
}

/// Serve on a listener bound already (by the process an upgrade took over from).
pub fn adopt(listener: std::net::TcpListener) -> io::Result<Bound> {
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    Ok(Bound(listener, addr))
}

impl Bound {
    /// Another descriptor of the listener, to hand it to a new process on upgrade.
    pub fn dup(&self) -> io::Result<std::os::fd::OwnedFd> {
        Ok(self.0.try_clone()?.into())
    }
}

/// The running admin server; dropping it stops the server and joins its thread.
pub struct Admin {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub addr: SocketAddr,
}

/// What every connection of the server shares.
struct Ctx {
    registry: Arc<Mutex<Registry>>,
    asks: crossbeam_channel::Sender<Ask>,
    token: Option<String>,
    limits: Limits,
    counters: Arc<Counters>,
    in_flight: AtomicUsize,
}

impl Admin {
    /// Serve on a thread of its own. With a `token`, requests that change anything (PUT, POST,
    /// DELETE) need `Authorization: Bearer TOKEN`; reads stay open.
    pub fn start(
        bound: Bound,
        registry: Arc<Mutex<Registry>>,
        asks: crossbeam_channel::Sender<Ask>,
        token: Option<String>,
        limits: Limits,
    ) -> Result<Admin, String> {
        let Bound(listener, addr) = bound;
        let counters = Arc::clone(&registry.lock().unwrap_or_else(|p| p.into_inner()).admin);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .max_blocking_threads(MAX_IN_FLIGHT)
            .thread_name("tether-admin-req")
            .build()
            .map_err(|e| format!("admin runtime: {e}"))?;
        let listener = {
            let _in_runtime = runtime.enter();
            tokio::net::TcpListener::from_std(listener)
                .map_err(|e| format!("--admin {addr}: {e}"))?
        };
        let ctx = Arc::new(Ctx {
            registry,
            asks,
            token,
            limits,
            counters,
            in_flight: AtomicUsize::new(0),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let open = Arc::clone(&ctx.counters);
        let thread = std::thread::Builder::new()
            .name("tether-admin".into())
            .spawn(move || {
                runtime.block_on(async move {
                    accept_loop(listener, ctx, stopped).await;
                    // Answers under way are finished (the one to an upgrade request, say),
                    // for a moment: a handler may wait 30 s for a reload, shutdown does not.
                    let until = tokio::time::Instant::now() + DRAIN;
                    while open.open.load(Relaxed) > 0 && tokio::time::Instant::now() < until {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                });
                runtime.shutdown_timeout(Duration::from_millis(100));
            })
            .map_err(|e| format!("admin thread: {e}"))?;
        Ok(Admin { stop: Some(stop), thread: Some(thread), addr })
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Accept until told to stop. Never returns on an error: it backs off and tries again.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    ctx: Arc<Ctx>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                let n = ctx.counters.accept_errors.fetch_add(1, Relaxed) + 1;
                if n.is_power_of_two() {
                    log::warn!("admin: accept failed ({n} so far): {e}; retrying");
                }
                if exhausted(&e) {
                    // Retrying at once would fail the same way and spin; the client waits in
                    // the backlog meanwhile (FAILURE-MODES F3).
                    tokio::select! {
                        _ = &mut stop => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        let Some(slot) = Slot::take(&ctx) else {
            let n = ctx.counters.refused.fetch_add(1, Relaxed) + 1;
            if n.is_power_of_two() {
                log::warn!(
                    "admin: {} connections open, closing the one from {peer} ({n} so far)",
                    ctx.limits.max_conns
                );
            }
            drop(stream);
            continue;
        };
        tokio::spawn(connection(stream, peer, slot));
    }
}

/// Whether an accept error means the process or system ran out of something, so that trying
/// again at once would fail the same way.
fn exhausted(e: &io::Error) -> bool {
    use nix::libc;
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// One of the `max_conns` connection places; given back on drop.
struct Slot(Arc<Ctx>);

impl Slot {
    fn take(ctx: &Arc<Ctx>) -> Option<Slot> {
        let open = &ctx.counters.open;
        if open.fetch_add(1, Relaxed) >= ctx.limits.max_conns as u64 {
            open.fetch_sub(1, Relaxed);
            return None;
        }
        Some(Slot(Arc::clone(ctx)))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.counters.open.fetch_sub(1, Relaxed);
    }
}

/// Serve one connection until the client closes it, breaks a limit, or the server stops.
async fn connection(stream: TcpStream, peer: SocketAddr, slot: Slot) {
    let ctx = Arc::clone(&slot.0);
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched { inner: stream, activity: Arc::clone(&activity) });
    let serving = Arc::clone(&activity);
    let service = hyper::service::service_fn(move |request| {
        let ctx = Arc::clone(&ctx);
        let activity = Arc::clone(&serving);
        async move { Ok::<_, Infallible>(respond(request, peer, ctx, activity).await) }
    });
    let timeout = slot.0.limits.timeout;
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(timeout).max_buf_size(MAX_HEAD);
    let served = builder.serve_connection(io, service);
    tokio::select! {
        served = served => match served {
            Ok(()) => {}
            Err(e) => {
                if e.is_timeout() {
                    slot.0.counters.timeouts.fetch_add(1, Relaxed);
                }
                log::debug!("admin: connection from {peer}: {e}");
            }
        },
        () = stalled(&activity, timeout) => {
            slot.0.counters.timeouts.fetch_add(1, Relaxed);
            log::debug!("admin: connection from {peer}: nothing moved for {timeout:?}, closed");
        }
    }
    drop(slot);
}

/// When bytes last moved on a connection, and whether a request is being handled.
struct Activity {
    start: Instant,
    /// Milliseconds after `start`.
    last: AtomicU64,
    handling: AtomicUsize,
}

impl Activity {
    fn new() -> Activity {
        Activity { start: Instant::now(), last: AtomicU64::new(0), handling: AtomicUsize::new(0) }
    }

    fn touch(&self) {
        self.last.store(self.start.elapsed().as_millis() as u64, Relaxed);
    }

    fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// Resolves once no byte has moved for `timeout` while no request was being handled.
async fn stalled(activity: &Activity, timeout: Duration) {
    loop {
        if activity.handling.load(Relaxed) > 0 {
            tokio::time::sleep(timeout).await;
            continue;
        }
        let idle = activity.idle();
        if idle >= timeout {
            return;
        }
        tokio::time::sleep(timeout - idle).await;
    }
}

/// A stream that notes every read or write that moved bytes.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// One of the [`MAX_IN_FLIGHT`] handler places; given back on drop.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn take(in_flight: &'a AtomicUsize) -> Option<InFlight<'a>> {
        if in_flight.fetch_add(1, Relaxed) >= MAX_IN_FLIGHT {
            in_flight.fetch_sub(1, Relaxed);
            return None;
        }
        Some(InFlight(in_flight))
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Answer one request: check the token, read a bounded body in time, run the endpoint on a
/// blocking thread.
async fn respond(
    request: Request<Incoming>,
    peer: SocketAddr,
    ctx: Arc<Ctx>,
    activity: Arc<Activity>,
) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let method = parts.method;
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or("").to_string();
    let changes = matches!(method, Method::PUT | Method::POST | Method::DELETE | Method::PATCH);
    if let (true, Some(token)) = (changes, &ctx.token) {
        let given = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
            log::warn!("admin: {method} {path} from {peer} without a valid token");
            let answer = api::error(401, "this needs `Authorization: Bearer <admin token>`");
            return reply(answer);
        }
    }
    let declared = parts.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok());
    if declared.is_some_and(|n: u64| n > MAX_BODY as u64) {
        return reply(api::error(413, &format!("the body is larger than {MAX_BODY} bytes")));
    }
    let body = if matches!(method, Method::PUT | Method::POST) {
        match read_body(body, ctx.limits.timeout).await {
            Ok(body) => body,
            Err(answer) => return reply(answer),
        }
    } else {
        String::new()
    };
    let Some(ticket) = InFlight::take(&ctx.in_flight) else {
        return reply(api::error(503, "too many admin requests at once"));
    };
    activity.handling.fetch_add(1, Relaxed);
    let handler = Arc::clone(&ctx);
    let answered = tokio::task::spawn_blocking(move || {
        let call = api::Call { method: &method, path: &path, query: &query, body: &body };
        api::route(&call, &handler.registry, &handler.asks)
    })
    .await;
    activity.handling.fetch_sub(1, Relaxed);
    activity.touch();
    drop(ticket);
    match answered {
        Ok(answer) => reply(answer),
        Err(e) => {
            log::error!("admin: request handler failed: {e}");
            reply(api::error(500, "the request handler failed"))
        }
    }
}

/// The body as text: at most [`MAX_BODY`] bytes, all of it within `timeout`.
async fn read_body(body: Incoming, timeout: Duration) -> Result<String, api::Answer> {
    let collected = tokio::time::timeout(timeout, Limited::new(body, MAX_BODY).collect()).await;
    let bytes = match collected {
        Err(_) => {
            return Err(api::error(408, &format!("the body did not arrive within {timeout:?}")))
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(api::error(413, &format!("the body is larger than {MAX_BODY} bytes")))
        }
        Ok(Err(e)) => return Err(api::error(400, &format!("reading the body: {e}"))),
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    String::from_utf8(bytes.to_vec()).map_err(|_| api::error(400, "the body is not UTF-8"))
}

fn reply(answer: api::Answer) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(answer.body)));
    *response.status_mut() = hyper::StatusCode::from_u16(answer.status)
        .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(answer.kind));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
