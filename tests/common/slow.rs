//! Clients that stop reading, and what the server's process spends on them.
//!
//! Owns: [`slow_reader`] (a TCP connection with a small receive buffer,
//! set before the handshake so the window it advertises stays small),
//! [`peer_closed`] (whether the server closed or reset a connection, seen
//! without reading from it, so the test never drains what it holds),
//! [`unread_bytes`] (how much of the server's answer has arrived). What the
//! server's process spends on them is in `super::process`. Every wait here
//! is bounded.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::{Duration, Instant};

/// Connects to `addr` with `SO_RCVBUF` set to `rcvbuf` bytes before the
/// handshake.
pub fn slow_reader(addr: SocketAddr, rcvbuf: i32) -> TcpStream {
    let SocketAddr::V4(v4) = addr else {
        panic!("the tests listen on IPv4 loopback");
    };
    // SAFETY: plain socket calls on a descriptor this function owns until
    // it is handed to `TcpStream`, which closes it.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let stream = TcpStream::from_raw_fd(fd);
        let size = rcvbuf;
        let set = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw const size).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        );
        assert_eq!(set, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(v4.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        let connected = libc::connect(
            fd,
            (&raw const sin).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(connected, 0, "connect {addr}: {}", std::io::Error::last_os_error());
        stream
    }
}

/// Whether the server closed or reset `stream` within `limit`, judged by
/// `poll` alone (nothing is read, so nothing the server sent is taken).
pub fn peer_closed(stream: &impl AsRawFd, limit: Duration) -> bool {
    let start = Instant::now();
    loop {
        let mut pfd = libc::pollfd {
            fd: stream.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd for a descriptor `stream` owns.
        let ready = unsafe { libc::poll(&raw mut pfd, 1, 100) };
        if ready > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
    }
}

/// Bytes that arrived on `stream` and were not read yet.
pub fn unread_bytes(stream: &impl AsRawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    let r = unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &raw mut n) };
    if r == 0 { n.max(0) as usize } else { 0 }
}
