//! Running the engine on a thread of its own: for programs that embed it,
//! and for the integration tests and the load harness, which all need "serve
//! on this listener until told to stop, then say how it ended".
//!
//! Owns: the thread, its actix `System`, and the stop signal. Must not
//! touch: anything [`crate::run`] does; this only drives it.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use crate::config::Config;

/// An engine serving on its own thread; [`ServerThread::stop`] drains it and
/// joins. Dropping it stops it too (and ignores how it ended).
pub struct ServerThread {
    addr: SocketAddr,
    grpc_addr: Option<SocketAddr>,
    unix_socket: Option<PathBuf>,
    grpc_unix_socket: Option<PathBuf>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl ServerThread {
    /// Starts [`crate::serve`] on `listener` (and, when `grpc.enabled`, on
    /// `grpc.bind`, and on the Unix sockets the config sets: all bound here,
    /// so [`ServerThread::grpc_addr`] is known at once and a socket that
    /// cannot be bound is this call's error) with `config` in a new thread
    /// named `name`. Returns at once: the engine may still be loading (poll
    /// `/readyz`).
    pub fn spawn(name: &str, listener: TcpListener, config: Config) -> std::io::Result<ServerThread> {
        let addr = listener.local_addr()?;
        let listeners = crate::Listeners::bind(listener, &config)?;
        let grpc_addr = listeners.grpc.as_ref().map(TcpListener::local_addr).transpose()?;
        let path_of = |s: &Option<crate::UnixSocket>| s.as_ref().map(|s| s.path().to_path_buf());
        let unix_socket = path_of(&listeners.http_unix);
        let grpc_unix_socket = path_of(&listeners.grpc_unix);
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name(name.to_string()).spawn(move || {
            let shutdown = async move {
                // A dropped sender (the owner went away) also means stop.
                let _ = stopped.await;
            };
            actix_rt::System::new()
                .block_on(crate::serve(
                    listeners,
                    config,
                    shutdown,
                    futures_util::stream::pending(),
                ))
                .map_err(|e| e.to_string())
        })?;
        Ok(ServerThread {
            addr,
            grpc_addr,
            unix_socket,
            grpc_unix_socket,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where gRPC is served (`None` with `grpc.enabled = false`).
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc_addr
    }

    /// Where the HTTP routes are also served (`server.unix_socket`).
    pub fn unix_socket(&self) -> Option<&Path> {
        self.unix_socket.as_deref()
    }

    /// Where gRPC is also served (`grpc.unix_socket`, gRPC enabled).
    pub fn grpc_unix_socket(&self) -> Option<&Path> {
        self.grpc_unix_socket.as_deref()
    }

    /// `http://IP:PORT`
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// True once the server's thread has ended (start-up failed, or stopped).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Asks the server to drain and waits for its thread: `Err` with the
    /// reason when it returned an error or panicked.
    pub fn stop(mut self) -> Result<(), String> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), String> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take() {
            None => Ok(()),
            Some(thread) => thread
                .join()
                .unwrap_or_else(|_| Err("the server thread panicked".to_string())),
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}
