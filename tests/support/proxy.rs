//! A small TCP proxy for network-cut tests: forwards 127.0.0.1:port to a
//! target; `cut` drops every connection and refuses new ones until
//! `restore`; `freeze` accepts connections and passes nothing either way
//! (a frozen host, a route that black-holes) until `thaw`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub port: u16,
    cut: Arc<AtomicBool>,
    frozen: watch::Sender<bool>,
    /// While set, what the client sends is dropped (what the server sends
    /// still passes).
    hold_upstream: watch::Sender<bool>,
    /// How long what the client sends waits before it is passed on.
    delay: watch::Sender<std::time::Duration>,
    generation: watch::Sender<u64>,
    counter: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target_port: u16) -> Self {
        Self::start_on(0, target_port).await
    }

    /// A proxy listening on `port` (0: any free port).
    pub async fn start_on(port: u16, target_port: u16) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let (frozen, _) = watch::channel(false);
        let (generation, _) = watch::channel(0u64);
        let (hold_upstream, _) = watch::channel(false);
        let (delay, _) = watch::channel(std::time::Duration::ZERO);
        let counter = Arc::new(AtomicU64::new(0));
        let task = {
            let cut = Arc::clone(&cut);
            let generation = generation.clone();
            let hold_upstream = hold_upstream.clone();
            let delay = delay.clone();
            let frozen = frozen.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        return;
                    };
                    if cut.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let mut cut_signal = generation.subscribe();
                    let hold = hold_upstream.subscribe();
                    let delay = delay.subscribe();
                    let (up_frozen, mut down_frozen) = (frozen.subscribe(), frozen.subscribe());
                    tokio::spawn(async move {
                        // A frozen host accepts and then says nothing.
                        while *down_frozen.borrow_and_update() {
                            tokio::select! {
                                _ = down_frozen.changed() => {}
                                _ = cut_signal.changed() => return,
                            }
                        }
                        let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)).await
                        else {
                            return;
                        };
                        let (mut cr, mut cw) = client.into_split();
                        let (mut sr, mut sw) = server.into_split();
                        tokio::select! {
                            _ = upstream(&mut cr, &mut sw, hold, up_frozen, delay) => {}
                            _ = downstream(&mut sr, &mut cw, down_frozen) => {}
                            _ = cut_signal.changed() => {}
                        }
                    });
                }
            })
        };
        Proxy {
            port,
            cut,
            frozen,
            hold_upstream,
            delay,
            generation,
            counter,
            task,
        }
    }

    /// Makes what clients send wait `delay` before it is passed on (a slow
    /// network, or a slow broker as the client sees it).
    pub fn set_delay(&self, delay: std::time::Duration) {
        self.delay.send_replace(delay);
    }

    /// Drops what clients send (a relay's status updates never reach
    /// PostgreSQL) until `release_upstream`.
    pub fn hold_upstream(&self) {
        self.hold_upstream.send_replace(true);
    }

    pub fn release_upstream(&self) {
        self.hold_upstream.send_replace(false);
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        let n = self.counter.fetch_add(1, Ordering::SeqCst) + 1;
        self.generation.send_replace(n);
    }

    /// Passes nothing either way, on open connections and new ones (which
    /// are accepted), until `thaw`: a host that froze.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies server to client, dropping what comes while `frozen` is set.
async fn downstream(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    frozen: watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if *frozen.borrow() {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Copies client to server; while `hold` or `frozen` is set, what the
/// client sends is read and dropped, as a network losing it would.
async fn upstream(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    hold: watch::Receiver<bool>,
    frozen: watch::Receiver<bool>,
    delay: watch::Receiver<std::time::Duration>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if *hold.borrow() || *frozen.borrow() {
            continue;
        }
        let wait = *delay.borrow();
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
