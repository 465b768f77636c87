//! A TCP proxy that a test can cut and restore: a network failure between two processes
//! (a worker and its scheduler) without killing either.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

#[derive(Debug, Default)]
struct State {
    cut: bool,
    connections: Vec<JoinHandle<()>>,
    accepted: usize,
}

/// Forwards every connection made to `127.0.0.1:<free port>` to a target address, until
/// [`TcpProxy::cut`]. It runs on the runtime of the task that started it and stops when
/// dropped.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    accept: JoinHandle<()>,
}

impl TcpProxy {
    /// Starts forwarding to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(Mutex::new(State::default()));
        let shared = Arc::clone(&state);
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let mut state = shared.lock().unwrap_or_else(|p| p.into_inner());
                state.accepted += 1;
                if state.cut {
                    // Refused: the connection is closed at once.
                    drop(inbound);
                    continue;
                }
                state.connections.retain(|c| !c.is_finished());
                state
                    .connections
                    .push(tokio::spawn(forward(inbound, target)));
            }
        });
        Self {
            addr,
            state,
            accept,
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every forwarded connection (both ends see it closed) and closes new ones at
    /// once, until [`TcpProxy::restore`].
    pub fn cut(&self) {
        let mut state = self.lock();
        state.cut = true;
        for connection in state.connections.drain(..) {
            connection.abort();
        }
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.lock().cut = false;
    }

    /// How many connections were made to it so far (refused ones included).
    pub fn accepted(&self) -> usize {
        self.lock().accepted
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        for connection in self.lock().connections.drain(..) {
            connection.abort();
        }
    }
}

async fn forward(mut inbound: TcpStream, target: SocketAddr) {
    let Ok(mut outbound) = TcpStream::connect(target).await else {
        return;
    };
    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An echo server on a free port.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut rx, mut tx) = stream.split();
                    let _ = tokio::io::copy(&mut rx, &mut tx).await;
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
        stream.write_all(b"ping").await?;
        let mut buf = [0_u8; 4];
        stream.read_exact(&mut buf).await?;
        Ok(buf.to_vec())
    }

    #[tokio::test]
    async fn forwards_until_cut_and_again_once_restored() {
        let proxy = TcpProxy::start(echo().await).await;
        let mut open = TcpStream::connect(proxy.addr()).await.expect("connect");
        assert_eq!(round_trip(&mut open).await.expect("echo"), b"ping");

        proxy.cut();
        let mut buf = Vec::new();
        assert_eq!(
            open.read_to_end(&mut buf).await.unwrap_or(0),
            0,
            "a cut connection is closed"
        );
        let mut refused = TcpStream::connect(proxy.addr()).await.expect("connect");
        assert!(
            round_trip(&mut refused).await.is_err(),
            "new connections are closed while cut"
        );

        proxy.restore();
        let mut again = TcpStream::connect(proxy.addr()).await.expect("connect");
        assert_eq!(round_trip(&mut again).await.expect("echo"), b"ping");
        assert_eq!(proxy.accepted(), 3);
    }
}
