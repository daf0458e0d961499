//! The cluster's network: one network namespace per node, each joined to a bridge in the host's
//! namespace by a veth pair, and the faults iptables can make inside those namespaces.
//!
//! Node `i` (1-based) lives in namespace `kc<id>n<i>` with address `10.99.<id>.<i>`; the bridge
//! holds `10.99.<id>.254`, the address every client connects from. Partitions drop packets in
//! the receiving node's INPUT chain by source address, so clients (from the bridge address) always
//! reach every node: a partition separates nodes from each other, never from their clients.
//! Every connection between nodes goes through a proxy of this process ([`crate::proxy`]) that
//! can delay it: the latency fault.
//! Everything is removed on drop, and a namespace left by a crashed run is removed before reuse.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;

use crate::proxy::Delay;
use crate::proxy::Proxies;

/// A command that set up or changed the network failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("`{cmd}` failed: {detail}")]
    Command { cmd: String, detail: String },
    #[error("network namespaces need root (this runs as uid {0}); run as root, as CI does")]
    NotRoot(u32),
    #[error("latency proxy: {0}")]
    Proxy(String),
}

fn run(args: &[&str]) -> Result<(), NetError> {
    let out = Command::new(args[0]).args(&args[1..]).output().map_err(|e| NetError::Command {
        cmd: args.join(" "),
        detail: format!("cannot run {}: {e} (Debian: apt-get install iproute2 iptables)", args[0]),
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Command {
            cmd: args.join(" "),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|u| u.parse().ok()))
        })
        .unwrap_or(u32::MAX)
}

/// Node `i`'s address in the network of run `id`.
fn node_addr(id: u8, i: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(10, 99, id, i as u8)
}

/// The namespaces, veths and bridge of one run.
#[derive(Debug)]
pub struct Net {
    id: u8,
    nodes: usize,
    /// Directed links currently cut: `(from, to)` means packets from `from` do not reach `to`.
    cut: BTreeSet<(usize, usize)>,
    /// Whether random packet loss is on (see [`Net::lossy`]).
    lossy: bool,
    /// The delaying proxies on the links between nodes (stopped before the namespaces go).
    proxies: Option<Proxies>,
}

impl Net {
    /// Creates namespaces for `nodes` nodes. `id` (1..=250) keeps concurrent runs apart.
    pub fn create(id: u8, nodes: usize) -> Result<Net, NetError> {
        let uid = uid();
        if uid != 0 {
            return Err(NetError::NotRoot(uid));
        }
        let mut net = Net { id, nodes, cut: BTreeSet::new(), lossy: false, proxies: None };
        net.remove();
        let br = net.bridge();
        let br_addr = format!("{}/24", net.client_ip());
        run(&["ip", "link", "add", &br, "type", "bridge"])?;
        run(&["ip", "addr", "add", &br_addr, "dev", &br])?;
        run(&["ip", "link", "set", &br, "up"])?;
        for i in 1..=nodes {
            let (ns, host_end, ns_end) = (net.ns(i), format!("kc{id}v{i}"), format!("kc{id}p{i}"));
            let addr = format!("{}/24", net.ip(i));
            run(&["ip", "netns", "add", &ns])?;
            run(&["ip", "link", "add", &host_end, "type", "veth", "peer", "name", &ns_end])?;
            run(&["ip", "link", "set", &ns_end, "netns", &ns])?;
            run(&["ip", "link", "set", &host_end, "master", &br, "up"])?;
            run(&["ip", "-n", &ns, "addr", "add", &addr, "dev", &ns_end])?;
            run(&["ip", "-n", &ns, "link", "set", &ns_end, "up"])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        }
        let proxies = Proxies::start(nodes, |i| net.ns(i), Arc::new(move |j| node_addr(id, j)));
        net.proxies = Some(proxies.map_err(NetError::Proxy)?);
        for i in 1..=nodes {
            for j in (1..=nodes).filter(|&j| j != i) {
                let mut args =
                    vec!["ip".to_string(), "netns".into(), "exec".into(), net.ns(i), "iptables".into()];
                args.extend(crate::proxy::redirect_rule(&net.ip(j), j));
                run(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
            }
        }
        Ok(net)
    }

    pub fn nodes(&self) -> usize {
        self.nodes
    }

    fn bridge(&self) -> String {
        format!("kc{}br", self.id)
    }

    /// Node `i`'s namespace.
    pub fn ns(&self, i: usize) -> String {
        format!("kc{}n{i}", self.id)
    }

    /// Node `i`'s address.
    pub fn ip(&self, i: usize) -> String {
        node_addr(self.id, i).to_string()
    }

    /// The address clients connect from (the bridge's).
    pub fn client_ip(&self) -> String {
        format!("10.99.{}.254", self.id)
    }

    /// Drops packets from node `from` to node `to` (one direction).
    pub fn cut(&mut self, from: usize, to: usize) -> Result<(), NetError> {
        if from == to || !self.cut.insert((from, to)) {
            return Ok(());
        }
        let (ns, src) = (self.ns(to), self.ip(from));
        run(&["ip", "netns", "exec", &ns, "iptables", "-A", "INPUT", "-s", &src, "-j", "DROP"])
    }

    /// Cuts every link between the two groups, both ways.
    pub fn partition(&mut self, a: &[usize], b: &[usize]) -> Result<(), NetError> {
        for &x in a {
            for &y in b {
                self.cut(x, y)?;
                self.cut(y, x)?;
            }
        }
        Ok(())
    }

    /// Drops a random `percent` of the packets between nodes (every link, both ways): TCP
    /// retransmits, so messages arrive late and in bursts rather than not at all.
    pub fn lossy(&mut self, percent: u32) -> Result<(), NetError> {
        let probability = format!("{:.2}", f64::from(percent.min(100)) / 100.0);
        for to in 1..=self.nodes {
            for from in 1..=self.nodes {
                if from == to {
                    continue;
                }
                let (ns, src) = (self.ns(to), self.ip(from));
                #[rustfmt::skip]
                run(&["ip", "netns", "exec", &ns, "iptables", "-A", "INPUT", "-s", &src,
                      "-m", "statistic", "--mode", "random", "--probability", &probability, "-j", "DROP"])?;
                self.lossy = true;
            }
        }
        Ok(())
    }

    /// Delays the bytes from node `from` to node `to` by `delay` (through the proxy).
    pub fn slow(&mut self, from: usize, to: usize, delay: Delay) {
        if let Some(p) = &self.proxies {
            p.delays.set(from, to, delay);
        }
    }

    /// The links cut now, as `from->to` pairs.
    pub fn cuts(&self) -> Vec<(usize, usize)> {
        self.cut.iter().copied().collect()
    }

    fn slowed(&self) -> bool {
        self.proxies.as_ref().is_some_and(|p| p.delays.any())
    }

    /// Whether any link is cut, lossy or slow.
    pub fn faulty(&self) -> bool {
        !self.cut.is_empty() || self.lossy || self.slowed()
    }

    /// Restores every link.
    pub fn heal(&mut self) -> Result<(), NetError> {
        if let Some(p) = &self.proxies {
            p.delays.clear();
        }
        if self.cut.is_empty() && !self.lossy {
            return Ok(());
        }
        for i in 1..=self.nodes {
            run(&["ip", "netns", "exec", &self.ns(i), "iptables", "-F", "INPUT"])?;
        }
        self.cut.clear();
        self.lossy = false;
        Ok(())
    }

    /// Removes whatever this id's namespaces and bridge left behind (errors ignored: absent is fine).
    fn remove(&self) {
        for i in 1..=9 {
            let _ = Command::new("ip").args(["netns", "del", &self.ns(i)]).output();
            let _ = Command::new("ip").args(["link", "del", &format!("kc{}v{i}", self.id)]).output();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge()]).output();
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.proxies = None;
        self.remove();
    }
}
