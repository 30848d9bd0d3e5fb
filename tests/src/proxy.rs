//! A TCP proxy on loopback between node agents and the controller, that a test can cut (a
//! network partition) and heal.
//!
//! Each connection is carried by a pair of threads, one per direction. While the proxy is
//! cut, every connection it carried is closed and new ones are accepted and dropped at once,
//! so the agent sees a controller it cannot reach. While it drops replies, connections stay
//! open and the controller hears the agent, but every byte back is thrown away (a link that
//! fails one way). At most [`MAX_CONNECTIONS`] connections
//! are carried at a time; more are dropped like during a cut. Dropping the proxy stops it
//! and joins all its threads.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// More connections than a few node agents and CLI calls ever hold at once.
pub const MAX_CONNECTIONS: usize = 64;

/// How long the proxy waits for the controller to accept a forwarded connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// One carried connection: both sockets (to close them on a cut) and its two threads.
struct Carried {
    sockets: [TcpStream; 2],
    threads: Vec<JoinHandle<()>>,
}

impl Carried {
    fn close(&self) {
        for socket in &self.sockets {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }

    fn is_finished(&self) -> bool {
        self.threads.iter().all(JoinHandle::is_finished)
    }

    fn join(self) {
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

struct Shared {
    target: SocketAddr,
    /// Cut or stopping; changed only while `carried` is locked, so that no connection is
    /// let through after a cut has closed the others.
    cut: AtomicBool,
    /// Bytes from the target are read and thrown away.
    drop_replies: Arc<AtomicBool>,
    stopping: AtomicBool,
    carried: Mutex<Vec<Carried>>,
    /// Connections accepted and forwarded, for tests that want to see traffic pass.
    forwarded: AtomicU64,
    /// Connections accepted and dropped at once (cut, or too many).
    refused: AtomicU64,
}

/// A running proxy from 127.0.0.1:PORT (port picked by the OS) to `target`.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Starts forwarding to `target` on a free loopback port.
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the proxy to port 0");
        let addr = listener.local_addr().expect("the proxy's listen address");
        let shared = Arc::new(Shared {
            target,
            cut: AtomicBool::new(false),
            drop_replies: Arc::new(AtomicBool::new(false)),
            stopping: AtomicBool::new(false),
            carried: Mutex::new(Vec::new()),
            forwarded: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        });
        let acceptor = thread::Builder::new()
            .name(format!("proxy-{}", addr.port()))
            .spawn({
                let shared = shared.clone();
                move || accept_loop(listener, &shared)
            })
            .expect("starting the proxy's accept thread");
        Proxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// Starts a proxy to a controller URL such as `http://127.0.0.1:7070`.
    pub fn to_url(url: &str) -> Proxy {
        let host_port = url.trim_start_matches("http://").trim_end_matches('/');
        let target = host_port
            .parse()
            .unwrap_or_else(|e| panic!("the proxy needs an http://IP:PORT URL, not {url}: {e}"));
        Proxy::start(target)
    }

    /// The URL to give a node agent instead of the controller's.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes every carried connection and drops new ones until [`Proxy::heal`]. When it
    /// returns, no byte passes the proxy any more.
    pub fn cut(&self) {
        let closed = {
            let mut carried = self.shared.carried.lock().expect("proxy table poisoned");
            self.shared.cut.store(true, Ordering::SeqCst);
            std::mem::take(&mut *carried)
        };
        for connection in &closed {
            connection.close();
        }
        closed.into_iter().for_each(Carried::join);
    }

    /// From now on, throws away every byte the target sends, on open connections and new
    /// ones, while still carrying everything to it; until [`Proxy::heal`].
    pub fn drop_replies(&self) {
        self.shared.drop_replies.store(true, Ordering::SeqCst);
    }

    /// Lets new connections through again, and replies.
    pub fn heal(&self) {
        let _carried = self.shared.carried.lock().expect("proxy table poisoned");
        self.shared.cut.store(false, Ordering::SeqCst);
        self.shared.drop_replies.store(false, Ordering::SeqCst);
    }

    pub fn is_cut(&self) -> bool {
        self.shared.cut.load(Ordering::SeqCst)
    }

    /// How many connections were forwarded so far.
    pub fn forwarded(&self) -> u64 {
        self.shared.forwarded.load(Ordering::SeqCst)
    }

    /// How many connections were accepted and dropped so far.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.cut();
        // The acceptor blocks in accept(): one connection wakes it to see `stopping`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: &Arc<Shared>) {
    for client in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else {
            continue;
        };
        let mut carried = shared.carried.lock().expect("proxy table poisoned");
        reap_finished(&mut carried);
        if shared.cut.load(Ordering::SeqCst) || carried.len() >= MAX_CONNECTIONS {
            shared.refused.fetch_add(1, Ordering::SeqCst);
            drop(client);
            continue;
        }
        match carry(client, shared.target, shared.drop_replies.clone()) {
            Some(connection) => {
                shared.forwarded.fetch_add(1, Ordering::SeqCst);
                carried.push(connection);
            }
            None => {
                shared.refused.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

fn reap_finished(carried: &mut Vec<Carried>) {
    let (done, running): (Vec<Carried>, Vec<Carried>) =
        carried.drain(..).partition(Carried::is_finished);
    *carried = running;
    done.into_iter().for_each(Carried::join);
}

/// Connects to the target and starts the two copying threads; None if the target refuses
/// (the client is dropped, as a controller that is down would).
fn carry(client: TcpStream, target: SocketAddr, drop_replies: Arc<AtomicBool>) -> Option<Carried> {
    let upstream = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT).ok()?;
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let clones = (
        client.try_clone().ok()?,
        upstream.try_clone().ok()?,
        client.try_clone().ok()?,
        upstream.try_clone().ok()?,
    );
    let up = thread::Builder::new()
        .name("proxy-up".into())
        .spawn(move || copy(clones.0, clones.1, None))
        .ok()?;
    let down = match thread::Builder::new()
        .name("proxy-down".into())
        .spawn(move || copy(clones.3, clones.2, Some(drop_replies)))
    {
        Ok(down) => down,
        Err(_) => {
            let _ = client.shutdown(Shutdown::Both);
            let _ = up.join();
            return None;
        }
    };
    Some(Carried {
        sockets: [client, upstream],
        threads: vec![up, down],
    })
}

/// Copies bytes one way until either side ends, then closes both: a half-closed gRPC
/// connection is of no use to anyone, and it frees the other thread at once. While
/// `discard` is set, what is read is thrown away.
fn copy(mut from: TcpStream, mut to: TcpStream, discard: Option<Arc<AtomicBool>>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if discard.as_ref().is_some_and(|d| d.load(Ordering::SeqCst)) {
                    continue;
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
