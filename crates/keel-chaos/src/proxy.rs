//! A delaying TCP proxy on every link between nodes: the latency nemesis (`tc netem` is not
//! available on these kernels).
//!
//! Inside node `i`'s namespace, iptables redirects every new connection to another node's peer
//! port (`10.99.<id>.<j>:2380`) to `127.0.0.1:PROXY_PORT_BASE + j`, where a proxy thread of this
//! process, itself inside that namespace, accepts it and connects on to the real `j:2380`. Its
//! own connection carries a firewall mark that the redirect skips. So the bytes still leave node
//! `i`'s namespace from node `i`'s address to node `j`'s: the partitions and packet loss of
//! [`crate::net`] (by source address, in the receiver's INPUT chain) apply unchanged, and the
//! proxy only adds time. Bytes read from one side are written to the other once the link's delay
//! has passed since they were read, in order; with no delay set they go through at once.
//!
//! Each namespace gets one thread (the socket calls of a thread inside a namespace happen there)
//! running a single-threaded tokio runtime for all of that node's outgoing links.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use rand::Rng as _;
use tokio::io::AsyncReadExt as _;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpListener;
use tokio::net::TcpSocket;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The peer port every node listens on.
pub const PEER_PORT: u16 = 2380;
/// The proxy for the link to node `j` listens on `127.0.0.1:PROXY_PORT_BASE + j`.
pub const PROXY_PORT_BASE: u16 = 23800;
/// The mark on the proxy's own connections, which the redirect rule lets through.
const MARK: u32 = 0x6b65;
/// How long the proxy waits to connect on to the real node.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A link's delay: `base` plus up to `jitter`, drawn for each chunk of bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delay {
    pub base: Duration,
    pub jitter: Duration,
}

impl Delay {
    fn draw(self) -> Duration {
        if self.jitter.is_zero() {
            self.base
        } else {
            self.base + rand::thread_rng().gen_range(Duration::ZERO..=self.jitter)
        }
    }
}

/// The delays of the directed links `(from, to)` that have one.
#[derive(Debug, Default)]
pub struct Delays(Mutex<BTreeMap<(usize, usize), Delay>>);

impl Delays {
    fn get(&self, link: (usize, usize)) -> Delay {
        self.0.lock().expect("delays lock").get(&link).copied().unwrap_or_default()
    }

    pub fn set(&self, from: usize, to: usize, delay: Delay) {
        let mut map = self.0.lock().expect("delays lock");
        if delay == Delay::default() {
            map.remove(&(from, to));
        } else {
            map.insert((from, to), delay);
        }
    }

    pub fn clear(&self) {
        self.0.lock().expect("delays lock").clear();
    }

    pub fn any(&self) -> bool {
        !self.0.lock().expect("delays lock").is_empty()
    }
}

/// The proxy threads of one run; dropping it stops them.
#[derive(Debug)]
pub struct Proxies {
    pub delays: Arc<Delays>,
    stops: Vec<tokio::sync::watch::Sender<bool>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Where node `j` is reached: its address on the bridge, peer port.
pub type PeerAddrOf = dyn Fn(usize) -> Ipv4Addr + Send + Sync;

impl Proxies {
    /// Starts one proxy thread in each node's namespace (`ns(i)`), listening for node `i`'s
    /// connections to each other node. Returns once every listener is bound, or the first error.
    pub fn start(nodes: usize, ns: impl Fn(usize) -> String, ip: Arc<PeerAddrOf>) -> Result<Proxies, String> {
        let delays = Arc::new(Delays::default());
        let mut proxies = Proxies { delays: delays.clone(), stops: Vec::new(), threads: Vec::new() };
        for i in 1..=nodes {
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
            let (ns, delays, ip) = (ns(i), delays.clone(), ip.clone());
            let thread = std::thread::Builder::new()
                .name(format!("proxy-{ns}"))
                .spawn(move || serve_node(i, nodes, &ns, delays, ip, stop_rx, ready_tx))
                .map_err(|e| format!("start the proxy thread for node {i}: {e}"))?;
            proxies.stops.push(stop_tx);
            proxies.threads.push(thread);
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(format!("the proxy thread for node {i} died while starting")),
            }
        }
        Ok(proxies)
    }
}

impl Drop for Proxies {
    fn drop(&mut self) {
        for s in &self.stops {
            let _ = s.send(true);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The iptables arguments (after `iptables`) that send node `i`'s new connections to node `j`'s
/// peer port through the proxy.
pub fn redirect_rule(j_ip: &str, j: usize) -> Vec<String> {
    #[rustfmt::skip]
    let args = [
        "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", j_ip, "--dport", &PEER_PORT.to_string(),
        "-m", "mark", "!", "--mark", &MARK.to_string(),
        "-j", "REDIRECT", "--to-ports", &(PROXY_PORT_BASE + j as u16).to_string(),
    ];
    args.iter().map(|s| s.to_string()).collect()
}

/// Moves the calling thread into network namespace `ns` (as `ip netns exec` does).
fn enter_namespace(ns: &str) -> Result<(), String> {
    let path = format!("/var/run/netns/{ns}");
    let file = std::fs::File::open(&path).map_err(|e| format!("open {path}: {e}"))?;
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns into {ns}: {e}"))
}

fn serve_node(
    i: usize,
    nodes: usize,
    ns: &str,
    delays: Arc<Delays>,
    ip: Arc<PeerAddrOf>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let setup = enter_namespace(ns).and_then(|()| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("proxy runtime for {ns}: {e}"))
    });
    let rt = match setup {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    rt.block_on(async move {
        let mut listeners = Vec::new();
        for j in (1..=nodes).filter(|&j| j != i) {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, PROXY_PORT_BASE + j as u16));
            match TcpListener::bind(addr).await {
                Ok(l) => listeners.push((j, l)),
                Err(e) => {
                    let _ = ready.send(Err(format!("proxy in {ns}: bind {addr}: {e}")));
                    return;
                }
            }
        }
        let _ = ready.send(Ok(()));
        let mut tasks = tokio::task::JoinSet::new();
        for (j, listener) in listeners {
            let target = SocketAddr::from((ip(j), PEER_PORT));
            tasks.spawn(accept_loop(listener, (i, j), target, delays.clone()));
        }
        let _ = stop.wait_for(|s| *s).await;
        tasks.abort_all();
    });
}

async fn accept_loop(listener: TcpListener, link: (usize, usize), target: SocketAddr, delays: Arc<Delays>) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((inbound, _)) = accepted {
                    conns.spawn(relay(inbound, link, target, delays.clone()));
                }
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Connects on to `target` and relays both ways until either side is done. When the target
/// cannot be reached the inbound connection is dropped: the node sees its connection closed.
async fn relay(inbound: TcpStream, (from, to): (usize, usize), target: SocketAddr, delays: Arc<Delays>) {
    let Ok(Ok(outbound)) = tokio::time::timeout(CONNECT_TIMEOUT, connect_marked(target)).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    // Each direction ends once its reader saw the end and every delayed chunk was written; the
    // first to end closes both connections.
    tokio::select! {
        () = pump(in_read, out_write, (from, to), delays.clone()) => {}
        () = pump(out_read, in_write, (to, from), delays) => {}
    }
}

async fn connect_marked(target: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Mark, &MARK)
        .map_err(std::io::Error::from)?;
    socket.connect(target).await
}

/// Copies `from` to `to`, each chunk held until the link's delay has passed since it was read
/// (never before an earlier chunk: order is kept).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: (usize, usize),
    delays: Arc<Delays>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(256);
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            if tx.send((Instant::now(), buf[..n].to_vec())).await.is_err() {
                break;
            }
        }
    };
    let writer = async move {
        let mut last = Instant::now();
        while let Some((read_at, chunk)) = rx.recv().await {
            let due = (read_at + delays.get(link).draw()).max(last);
            if due > Instant::now() {
                tokio::time::sleep_until(due).await;
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
            last = due;
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
