//! The HTTP/2 handshake a new gRPC connection must finish before it counts
//! as live traffic (issue 21: silent sockets held every connection slot).
//!
//! Owns: reading the client's connection preface and first SETTINGS frame
//! within `grpc.handshake_timeout_ms` ([`read_preface`]), handing those
//! bytes back to hyper in front of the socket ([`Replay`]), and the class
//! of connections still in their handshake ([`Handshakes`]): at most
//! `grpc.max_handshaking_connections`, the oldest closed to make room for a
//! new one. A client speaks first in HTTP/2 (RFC 9113 3.4: the preface, then
//! SETTINGS, without waiting for the server), so a real client finishes this
//! within a round trip, and only sockets that stay silent are ever closed
//! here. Must not touch: HTTP/2 itself past the first frame (hyper's), what
//! a call answers, the connection limits of live traffic (`server.rs`).

use std::collections::BTreeMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

/// The client connection preface (RFC 9113 3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An HTTP/2 frame header: 24-bit length, type, flags, stream id.
const FRAME_HEADER: usize = 9;
const SETTINGS_FRAME: u8 = 0x4;
/// The largest frame payload a peer may send before SETTINGS says
/// otherwise (RFC 9113 4.2).
const MAX_FIRST_FRAME: usize = 16_384;

/// Why a connection did not finish its handshake.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the client closed the connection before its HTTP/2 preface")]
    Closed,
    #[error("not an HTTP/2 client: {0}")]
    NotHttp2(&'static str),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Reads the preface and the first frame, which must be SETTINGS, from a
/// TCP or Unix socket connection, and returns every byte read (hyper reads
/// them again through [`Replay`]). The caller bounds the time this may take.
pub async fn read_preface<S: AsyncRead + Unpin>(socket: &mut S) -> Result<Bytes, HandshakeError> {
    let mut buf = BytesMut::with_capacity(PREFACE.len() + FRAME_HEADER + 64);
    let mut needed = PREFACE.len() + FRAME_HEADER;
    while buf.len() < needed {
        if socket.read_buf(&mut buf).await? == 0 {
            return Err(HandshakeError::Closed);
        }
        let seen = buf.len().min(PREFACE.len());
        if buf[..seen] != PREFACE[..seen] {
            return Err(HandshakeError::NotHttp2("the first bytes are not the HTTP/2 preface"));
        }
        if needed == PREFACE.len() + FRAME_HEADER && buf.len() >= needed {
            let header = &buf[PREFACE.len()..needed];
            let length = usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
            if header[3] != SETTINGS_FRAME {
                return Err(HandshakeError::NotHttp2("the preface is not followed by SETTINGS"));
            }
            if length > MAX_FIRST_FRAME {
                return Err(HandshakeError::NotHttp2("the first SETTINGS frame is too large"));
            }
            needed += length;
        }
    }
    Ok(buf.freeze())
}

/// A socket whose first bytes were already read: they are read again
/// first, then the socket. Writes go straight to the socket.
pub struct Replay<S> {
    read: Bytes,
    tcp: S,
}

impl<S> Replay<S> {
    pub fn new(read: Bytes, tcp: S) -> Replay<S> {
        Replay { read, tcp }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.read.is_empty() {
            return Pin::new(&mut self.tcp).poll_read(cx, buf);
        }
        let n = self.read.len().min(buf.remaining());
        buf.put_slice(&self.read[..n]);
        self.read.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// The connections still in their handshake, oldest first. Each holds a
/// [`Ticket`]; a ticket whose entry is removed (to make room, or on stop)
/// sees [`Ticket::evicted`] resolve and its connection is closed.
pub struct Handshakes {
    cap: usize,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    next_id: u64,
    /// Dropping a sender wakes its ticket's `evicted`.
    by_age: BTreeMap<u64, oneshot::Sender<()>>,
}

impl Handshakes {
    pub fn new(cap: usize) -> Arc<Handshakes> {
        Arc::new(Handshakes {
            cap: cap.max(1),
            open: Mutex::new(Open::default()),
        })
    }

    fn open(&self) -> std::sync::MutexGuard<'_, Open> {
        // The map stays consistent whatever panicked while it was held.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a new connection, closing the oldest one still in its
    /// handshake when the class is full: a silent socket yields its place.
    pub fn begin(self: &Arc<Self>) -> Ticket {
        let (tx, rx) = oneshot::channel();
        let mut open = self.open();
        while open.by_age.len() >= self.cap {
            if open.by_age.pop_first().is_some() {
                tracing::debug!("gRPC: closing the oldest connection still in its handshake to make room");
            }
        }
        let id = open.next_id;
        open.next_id += 1;
        open.by_age.insert(id, tx);
        Ticket {
            id,
            evicted: rx,
            registry: Arc::clone(self),
        }
    }

    /// Ends every handshake in progress (the server is stopping).
    pub fn close_all(&self) {
        self.open().by_age.clear();
    }

    /// Connections in their handshake now.
    #[cfg(test)]
    pub fn in_progress(&self) -> usize {
        self.open().by_age.len()
    }
}

/// One connection's place in [`Handshakes`], released on drop.
pub struct Ticket {
    id: u64,
    evicted: oneshot::Receiver<()>,
    registry: Arc<Handshakes>,
}

impl Ticket {
    /// Resolves when the connection was closed to make room (or on stop).
    pub async fn evicted(&mut self) {
        let _ = (&mut self.evicted).await;
    }

    /// The handshake is done: leaves the class. `false` when the connection
    /// had been evicted in the meantime (it is then closed all the same).
    pub fn finish(self) -> bool {
        self.registry.open().by_age.remove(&self.id).is_some()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.registry.open().by_age.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_oldest_handshake_makes_room_and_finished_ones_leave() {
        let handshakes = Handshakes::new(2);
        let mut first = handshakes.begin();
        let second = handshakes.begin();
        assert_eq!(handshakes.in_progress(), 2);
        let third = handshakes.begin();
        // The first was closed to make room; its ticket says so at once.
        first.evicted().await;
        assert!(!first.finish());
        assert!(second.finish());
        assert_eq!(handshakes.in_progress(), 1);
        drop(third);
        assert_eq!(handshakes.in_progress(), 0);
        let mut fourth = handshakes.begin();
        handshakes.close_all();
        fourth.evicted().await;
        assert!(!fourth.finish());
    }

    async fn preface_of(bytes: Vec<u8>, close: bool) -> Result<Bytes, HandshakeError> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            c.write_all(&bytes).unwrap();
            if !close {
                // Keep the socket open until the server side is done.
                let mut sink = [0u8; 1];
                let _ = c.read(&mut sink);
            }
        });
        let (mut tcp, _) = listener.accept().await.unwrap();
        let result = read_preface(&mut tcp).await;
        drop(tcp);
        client.join().unwrap();
        result
    }

    #[tokio::test]
    async fn the_preface_and_a_whole_first_settings_frame_are_read_and_kept() {
        let mut valid = PREFACE.to_vec();
        valid.extend_from_slice(&[0, 0, 6, SETTINGS_FRAME, 0, 0, 0, 0, 0]);
        valid.extend_from_slice(&[0, 3, 0, 0, 0, 100]);
        valid.extend_from_slice(b"more");
        let read = preface_of(valid.clone(), false).await.unwrap();
        assert!(valid.starts_with(&read) && read.len() >= valid.len() - 4, "{read:?}");
        let http1 = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert!(matches!(
            preface_of(http1, false).await,
            Err(HandshakeError::NotHttp2(_))
        ));
        let mut headers_first = PREFACE.to_vec();
        headers_first.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 1]);
        assert!(matches!(
            preface_of(headers_first, false).await,
            Err(HandshakeError::NotHttp2(_))
        ));
        let mut huge = PREFACE.to_vec();
        huge.extend_from_slice(&[0xff, 0xff, 0xff, SETTINGS_FRAME, 0, 0, 0, 0, 0]);
        assert!(matches!(
            preface_of(huge, false).await,
            Err(HandshakeError::NotHttp2(_))
        ));
        let cut = PREFACE[..10].to_vec();
        assert!(matches!(preface_of(cut, true).await, Err(HandshakeError::Closed)));
    }
}
