//! One HTTP connection's guard: what a client that stops reading may cost,
//! how long its answers may wait, and when a draining server closes it.
//!
//! Owns: [`guard`], the service every accepted connection (TCP, or the
//! Unix socket's: [`Accepted`]) goes through before actix-http's HTTP/1
//! dispatcher; [`GuardedIo`], the socket the
//! dispatcher reads and writes (it records whether the socket refused
//! bytes, and since when, and holds the connection's reads back while an
//! answer is stuck); [`ConnGuard`], the future around the dispatcher; and
//! [`ConnHandle`], the connection's state as the request middleware sees it
//! (requests in flight, their deadlines); and [`Pieces`], the body a large
//! answer is written from. Must not touch: parsing, routes, what an answer
//! holds.
//!
//! A Unix socket connection gets the same guard: `TIOCOUTQ` and `FIONREAD`
//! answer for `AF_UNIX` stream sockets too (bytes the peer has not read,
//! bytes not read yet), and the drain, the send timeout and the pending
//! answer budget count them alike. Only the reset of an abandoned answer
//! differs: `SO_LINGER` means nothing there, so the close leaves what the
//! peer has not read in its receive queue (at most the socket's send
//! buffer) until it reads or closes.
//!
//! Why: actix-http's dispatcher wakes itself while its read buffer is full
//! (128 KiB of unparsed pipelined requests) even when nothing can move
//! because its writes are blocked, so a client that pipelines requests and
//! reads nothing kept an HTTP thread at 100 % CPU. [`ConnGuard`] polls the
//! dispatcher with a waker of its own and drops such a self-wake while the
//! socket refuses writes: the socket's write readiness wakes it when the
//! client reads again. An answer that has not drained within
//! `server.send_timeout_ms` (or its request's deadline, if later) closes the
//! connection, and its unsent bytes count against
//! `server.max_pending_answer_bytes` until then. "Unsent" includes what
//! waits in the kernel's send queue (`TIOCOUTQ`): a client with a small
//! window leaves a whole answer there, and socket memory is the pod's
//! memory too. And a large answer is handed to actix-http in [`PIECE`]-sized
//! pieces ([`Pieces`]): actix-http copies a body into its write buffer and
//! keeps that buffer's capacity for the connection's life, so one 1 MiB
//! answer used to pin 1 MiB of resident memory per keep-alive connection.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use actix_http::Protocol;
use actix_http::body::{BodySize, BoxBody, MessageBody};
use actix_rt::net::{TcpStream, UnixStream};
use actix_service::{Service, ServiceFactory};
use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::engine::held::{DrainSignal, HeldAnswers, Holding, OpenConnection};

/// What every connection's guard is configured with.
#[derive(Clone)]
pub struct ConnSettings {
    /// `server.send_timeout_ms`.
    pub send_timeout: Duration,
    /// The shared account of unsent answer bytes.
    pub held: Arc<HeldAnswers>,
    pub drain: DrainSignal,
}

/// Most bytes of an answer handed to actix-http at once (its write buffer
/// takes more body only while it holds less than 32 KiB).
pub const PIECE: usize = 32 * 1024;

/// Bytes written to the socket since its send queue was last looked at,
/// past which a flush looks again (small answers cost no system call).
const OUTQ_CHECK_BYTES: usize = 64 * 1024;

/// How often a connection whose answer waits in the kernel's send queue
/// looks whether it drained, so a drained answer stops counting soon.
const OUTQ_RECHECK: Duration = Duration::from_millis(100);

/// One connection's state, shared by its socket, its guard and (through
/// the connection data) its requests. All on the connection's HTTP thread.
struct ConnState {
    /// The socket (owned by the dispatcher, which the guard outlives not).
    fd: RawFd,
    /// Bytes written since the send queue was last looked at.
    written: Cell<usize>,
    /// When the send queue is to be looked at again while it holds bytes.
    next_check: Cell<Instant>,
    /// The socket refused bytes on the last write and nothing was written
    /// since: its write readiness will wake the connection.
    write_blocked: Cell<bool>,
    /// Since when part of an answer has been waiting for the socket; clear
    /// once the dispatcher's write buffer has drained.
    unsent_since: Cell<Option<Instant>>,
    /// The unsent bytes, as counted in the shared budget.
    unsent: RefCell<Holding>,
    /// A read was held back during this poll of the dispatcher.
    read_held: Cell<bool>,
    /// Requests whose handler is running.
    in_flight: Cell<usize>,
    /// Bytes were read since the last request was admitted: part of a
    /// request the dispatcher has not handed to a handler yet.
    read_since_admit: Cell<bool>,
    /// The latest deadline of a request on this connection.
    deadline: Cell<Option<Instant>>,
}

impl ConnState {
    /// When the unsent answer must have drained, if one is waiting.
    fn send_deadline(&self, send_timeout: Duration) -> Option<Instant> {
        let since = self.unsent_since.get()?;
        let deadline = since + send_timeout;
        Some(self.deadline.get().map_or(deadline, |d| d.max(deadline)))
    }

    /// Nothing in flight, unsent, read but not yet admitted, or waiting in
    /// the socket: a draining server may close the connection at once
    /// without losing a request the client already sent.
    fn is_idle(&self) -> bool {
        self.in_flight.get() == 0
            && self.unsent_since.get().is_none()
            && !self.read_since_admit.get()
            && recv_queue(self.fd) == 0
    }

    /// The dispatcher's own buffer is written; what the kernel still
    /// queues for the client is what this connection holds now.
    fn flushed(&self) {
        self.write_blocked.set(false);
        let looked_at = self.unsent_since.get().is_some();
        if !looked_at && self.written.get() < OUTQ_CHECK_BYTES {
            return;
        }
        self.look_at_send_queue(Instant::now());
    }

    /// What the kernel still queues for the client is what this connection
    /// holds now.
    fn look_at_send_queue(&self, now: Instant) {
        self.written.set(0);
        self.next_check.set(now + OUTQ_RECHECK);
        self.holds(send_queue(self.fd));
    }

    /// The connection holds `bytes` unsent (0: all of it has drained).
    fn holds(&self, bytes: usize) {
        self.unsent.borrow_mut().set(bytes);
        if bytes == 0 {
            self.unsent_since.set(None);
        } else if self.unsent_since.get().is_none() {
            self.unsent_since.set(Some(Instant::now()));
        }
    }
}

/// Bytes in `fd`'s send queue that the peer has not acknowledged.
fn send_queue(fd: RawFd) -> usize {
    let mut queued: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one int; `fd` is the connection's open socket.
    let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &raw mut queued) };
    if r == 0 {
        usize::try_from(queued).unwrap_or(0)
    } else {
        0
    }
}

/// Bytes waiting in `fd`'s receive queue, not read yet.
fn recv_queue(fd: RawFd) -> usize {
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int; `fd` is the connection's open socket.
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &raw mut queued) };
    if r == 0 {
        usize::try_from(queued).unwrap_or(0)
    } else {
        0
    }
}

/// The connection's state as a request sees it (in the connection data).
#[derive(Clone)]
pub struct ConnHandle(Rc<ConnState>);

impl ConnHandle {
    /// A request starts on this connection, due by `deadline`; the
    /// connection counts it as in flight until the returned value drops.
    pub fn start_request(&self, deadline: Instant) -> InFlight {
        let state = &self.0;
        state.in_flight.set(state.in_flight.get() + 1);
        state.read_since_admit.set(false);
        state
            .deadline
            .set(Some(state.deadline.get().map_or(deadline, |d| d.max(deadline))));
        InFlight(Rc::clone(state))
    }
}

/// A request being handled (see [`ConnHandle::start_request`]).
pub struct InFlight(Rc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let left = self.0.in_flight.get().saturating_sub(1);
        self.0.in_flight.set(left);
        if left == 0 {
            // What was read since its admission was its body (a request
            // pipelined behind it in the same read is the one case missed).
            self.0.read_since_admit.set(false);
        }
    }
}

/// An accepted connection of either listener.
pub enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// A connection an HTTP listener accepts: its descriptor, its peer, and
/// itself as a [`Socket`].
pub trait Accepted: AsRawFd {
    /// The peer's address (`None` on a Unix socket).
    fn peer(&self) -> Option<SocketAddr>;
    fn into_socket(self) -> Socket;
}

impl Accepted for TcpStream {
    fn peer(&self) -> Option<SocketAddr> {
        self.peer_addr().ok()
    }

    fn into_socket(self) -> Socket {
        Socket::Tcp(self)
    }
}

impl Accepted for UnixStream {
    fn peer(&self) -> Option<SocketAddr> {
        None
    }

    fn into_socket(self) -> Socket {
        Socket::Unix(self)
    }
}

/// Forwards a call to the socket, whichever kind it is.
macro_rules! on_socket {
    ($socket:expr, $io:ident => $call:expr) => {
        match $socket {
            Socket::Tcp($io) => $call,
            Socket::Unix($io) => $call,
        }
    };
}

impl AsyncRead for Socket {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        on_socket!(self.get_mut(), io => Pin::new(io).poll_read(cx, buf))
    }
}

impl AsyncWrite for Socket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        on_socket!(self.get_mut(), io => Pin::new(io).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_socket!(self.get_mut(), io => Pin::new(io).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_socket!(self.get_mut(), io => Pin::new(io).poll_shutdown(cx))
    }
}

/// The socket as the dispatcher sees it. Reads are held back while an
/// answer is stuck: a client that stops reading gets no more of its
/// requests parsed (and computed) until it reads again.
pub struct GuardedIo {
    io: Socket,
    state: Rc<ConnState>,
}

impl GuardedIo {
    /// The connection state, for the connection data (`on_connect_ext`).
    pub fn handle(&self) -> ConnHandle {
        ConnHandle(Rc::clone(&self.state))
    }
}

impl AsyncRead for GuardedIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.state.write_blocked.get() {
            // The socket's write readiness wakes the connection; the guard
            // re-polls it if the write turns out to go through this poll.
            self.state.read_held.set(true);
            return Poll::Pending;
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.state.read_since_admit.set(true);
        }
        polled
    }
}

impl AsyncWrite for GuardedIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        let state = &self.state;
        match polled {
            Poll::Pending => {
                state.write_blocked.set(true);
                // The dispatcher hands over all it holds, so what the socket
                // refused, and the full send queue, is what it holds.
                state.holds(buf.len() + send_queue(state.fd));
            }
            Poll::Ready(Ok(n)) => {
                state.write_blocked.set(false);
                state.written.set(state.written.get() + n);
            }
            Poll::Ready(Err(_)) => {}
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // actix-http flushes only once its whole write buffer is written.
        self.state.flushed();
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The guard around `inner`, a service over guarded connections (the HTTP
/// service): accepts raw TCP and Unix socket connections.
pub fn guard<F>(inner: F, settings: ConnSettings) -> GuardFactory<F> {
    GuardFactory { inner, settings }
}

pub struct GuardFactory<F> {
    inner: F,
    settings: ConnSettings,
}

/// What actix-http's service takes: the guarded socket, its protocol, its peer.
pub type HttpIo = (GuardedIo, Protocol, Option<SocketAddr>);

impl<F, T> ServiceFactory<T> for GuardFactory<F>
where
    T: Accepted,
    F: ServiceFactory<HttpIo, Config = (), Response = ()>,
    F::Future: 'static,
{
    type Response = ();
    type Error = F::Error;
    type Config = ();
    type Service = GuardService<F::Service>;
    type InitError = F::InitError;
    type Future = LocalBoxFuture<'static, Result<Self::Service, Self::InitError>>;

    fn new_service(&self, (): ()) -> Self::Future {
        let inner = self.inner.new_service(());
        let settings = self.settings.clone();
        Box::pin(async move {
            Ok(GuardService {
                inner: inner.await?,
                settings,
            })
        })
    }
}

pub struct GuardService<S> {
    inner: S,
    settings: ConnSettings,
}

impl<S, T> Service<T> for GuardService<S>
where
    T: Accepted,
    S: Service<HttpIo, Response = ()>,
{
    type Response = ();
    type Error = S::Error;
    type Future = ConnGuard<S::Future>;

    actix_service::forward_ready!(inner);

    fn call(&self, io: T) -> Self::Future {
        let peer = io.peer();
        let state = Rc::new(ConnState {
            fd: io.as_raw_fd(),
            written: Cell::new(0),
            next_check: Cell::new(Instant::now()),
            write_blocked: Cell::new(false),
            unsent_since: Cell::new(None),
            unsent: RefCell::new(Holding::new(Arc::clone(&self.settings.held))),
            read_held: Cell::new(false),
            in_flight: Cell::new(0),
            read_since_admit: Cell::new(false),
            deadline: Cell::new(None),
        });
        let io = GuardedIo {
            io: io.into_socket(),
            state: Rc::clone(&state),
        };
        let drain = self.settings.drain.raised();
        ConnGuard {
            _open: self.settings.drain.connection_opened(),
            inner: Box::pin(self.inner.call((io, Protocol::Http1, peer))),
            state,
            send_timeout: self.settings.send_timeout,
            timer: None,
            drain: Some(Box::pin(drain)),
            waker: Arc::new(FilterWaker::default()),
        }
    }
}

/// The dispatcher of one connection, polled through a [`FilterWaker`],
/// closed when an answer does not drain in time or when the server drains
/// and the connection is idle.
pub struct ConnGuard<F> {
    /// Boxed: the guard itself is then `Unpin` (one allocation per connection).
    inner: Pin<Box<F>>,
    state: Rc<ConnState>,
    send_timeout: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    drain: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    waker: Arc<FilterWaker>,
    /// Counts the connection as open until the guard drops (the drain
    /// waits for the count to reach zero).
    _open: OpenConnection,
}

impl<F, E> Future for ConnGuard<F>
where
    F: Future<Output = Result<(), E>>,
{
    type Output = Result<(), E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Some(drain) = &mut this.drain
            && drain.as_mut().poll(cx).is_ready()
        {
            this.drain = None;
        }
        let draining = this.drain.is_none();
        if draining && this.state.is_idle() {
            // Only requests in flight deserve the drain; an idle keep-alive
            // connection is closed at once.
            return Poll::Ready(Ok(()));
        }
        if past_send_deadline(&this.state, this.send_timeout, &mut this.timer, cx) {
            abandon(&this.state);
            return Poll::Ready(Ok(()));
        }
        this.state.read_held.set(false);
        let waker = this.waker.for_poll(cx.waker());
        let inner = &mut this.inner;
        let polled = this
            .waker
            .poll_inner(|| inner.as_mut().poll(&mut Context::from_waker(&waker)));
        if polled.is_ready() {
            return polled;
        }
        let state = &*this.state;
        let blocked = state.write_blocked.get();
        // A self-wake while the socket refuses writes is the dispatcher's
        // busy loop: nothing can move until the client reads, and then the
        // socket's write readiness wakes this connection. Any other
        // self-wake (or a read held back by a write that went through after
        // all) polls again.
        if (this.waker.take_self_woken() || state.read_held.get()) && !blocked {
            cx.waker().wake_by_ref();
        }
        if draining && state.is_idle() {
            cx.waker().wake_by_ref();
        }
        if past_send_deadline(state, this.send_timeout, &mut this.timer, cx) {
            abandon(state);
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    }
}

/// Abandons the connection's answer: the socket, closed when the guard
/// drops the dispatcher, is reset rather than closed in order, so the
/// kernel drops what it still queues (a FIN would wait behind it for a
/// window that never opens) and the client learns at once.
fn abandon(state: &ConnState) {
    tracing::debug!("an answer did not drain within server.send_timeout_ms: connection reset");
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: SO_LINGER reads one `linger`; `fd` is the connection's open socket.
    unsafe {
        libc::setsockopt(
            state.fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Whether the connection's unsent answer is past its send deadline. If it
/// is not, the timer is armed for that deadline, or sooner, while only the
/// kernel holds the answer, to look whether it drained (nothing else wakes
/// the connection when it does).
fn past_send_deadline(
    state: &ConnState,
    send_timeout: Duration,
    timer: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    cx: &mut Context<'_>,
) -> bool {
    let Some(deadline) = state.send_deadline(send_timeout) else {
        *timer = None;
        return false;
    };
    let now = Instant::now();
    let kernel_only = !state.write_blocked.get();
    if kernel_only && now >= state.next_check.get() {
        state.look_at_send_queue(now);
        if state.unsent_since.get().is_none() {
            *timer = None;
            return false;
        }
    }
    if now >= deadline {
        return true;
    }
    let wake_at = if kernel_only {
        deadline.min(state.next_check.get())
    } else {
        deadline
    };
    let wake_at = tokio::time::Instant::from_std(wake_at);
    let sleep = match timer {
        Some(sleep) if sleep.deadline() == wake_at => sleep,
        _ => timer.insert(Box::pin(tokio::time::sleep_until(wake_at))),
    };
    if sleep.as_mut().poll(cx).is_ready() {
        cx.waker().wake_by_ref();
    }
    false
}

thread_local! {
    /// The [`FilterWaker`] whose connection this thread is polling now.
    static POLLING: Cell<usize> = const { Cell::new(0) };
}

/// The dispatcher's waker: wakes from elsewhere (the socket, timers, the
/// engine's threads) go straight to the task; a wake the dispatcher makes
/// of itself during its own poll is only recorded, for the guard to judge.
#[derive(Default)]
struct FilterWaker {
    task: Mutex<Option<Waker>>,
    self_woken: std::sync::atomic::AtomicBool,
}

impl FilterWaker {
    /// A waker for this poll, forwarding to `task`.
    fn for_poll(self: &Arc<Self>, task: &Waker) -> Waker {
        let mut slot = self.task.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !slot.as_ref().is_some_and(|w| w.will_wake(task)) {
            *slot = Some(task.clone());
        }
        Waker::from(Arc::clone(self))
    }

    /// Runs `poll` with this waker marked as the one being polled.
    fn poll_inner<T>(self: &Arc<Self>, poll: impl FnOnce() -> T) -> T {
        let id = Arc::as_ptr(self) as usize;
        let outer = POLLING.with(|p| p.replace(id));
        let result = poll();
        POLLING.with(|p| p.set(outer));
        result
    }

    fn take_self_woken(&self) -> bool {
        self.self_woken.swap(false, std::sync::atomic::Ordering::Relaxed)
    }
}

impl Wake for FilterWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let id = Arc::as_ptr(self) as usize;
        if POLLING.with(Cell::get) == id {
            self.self_woken.store(true, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        let task = self.task.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(task) = task.as_ref() {
            task.wake_by_ref();
        }
    }
}

/// A large answer, handed to actix-http [`PIECE`] bytes at a time; what it
/// has not handed over yet counts as held (its memory stays allocated
/// until the last piece is written).
pub struct Pieces {
    rest: Bytes,
    held: Holding,
}

impl Pieces {
    /// `body` as the body of a response: larger than [`PIECE`], in pieces
    /// counted against `account`; otherwise as it is (no cost).
    pub fn wrap(body: impl MessageBody + 'static, account: &Arc<HeldAnswers>) -> BoxBody {
        let large = matches!(body.size(), BodySize::Sized(n) if n > PIECE as u64);
        if !large {
            return body.boxed();
        }
        match body.try_into_bytes() {
            Ok(bytes) => {
                let mut held = Holding::new(Arc::clone(account));
                held.set(bytes.len());
                BoxBody::new(Pieces { rest: bytes, held })
            }
            // A streamed body already comes in pieces.
            Err(body) => body.boxed(),
        }
    }
}

impl MessageBody for Pieces {
    type Error = std::convert::Infallible;

    fn size(&self) -> BodySize {
        BodySize::Sized(self.rest.len() as u64)
    }

    fn poll_next(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = self.get_mut();
        if this.rest.is_empty() {
            return Poll::Ready(None);
        }
        let piece = this.rest.split_to(this.rest.len().min(PIECE));
        this.held.set(this.rest.len());
        Poll::Ready(Some(Ok(piece)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_body_is_handed_over_in_counted_pieces() {
        let account = HeldAnswers::new(1 << 20);
        let data = Bytes::from(vec![7u8; 3 * PIECE + 5]);
        let mut body = Pieces::wrap(data.clone(), &account);
        assert_eq!(body.size(), BodySize::Sized(data.len() as u64));
        assert_eq!(account.held(), data.len());
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut out = Vec::new();
        while let Poll::Ready(Some(Ok(piece))) = Pin::new(&mut body).poll_next(&mut cx) {
            assert!(piece.len() <= PIECE);
            out.extend_from_slice(&piece);
        }
        assert_eq!(out, data);
        drop(body);
        assert_eq!(account.held(), 0);
        // A small body is passed through as bytes, uncounted.
        let small = Pieces::wrap(Bytes::from_static(b"{}"), &account);
        assert_eq!(small.try_into_bytes().ok(), Some(Bytes::from_static(b"{}")));
        assert_eq!(account.held(), 0);
    }
}
