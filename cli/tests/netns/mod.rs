//! Pod networking for the cluster rehearsal: one network namespace per pod, each with
//! a veth pair into a bridge in the test's own namespace (the "node", address
//! `SUBNET.1`, from which probes come as the kubelet's do), and a hosts file that
//! `ip netns exec` mounts over the pod's `/etc/hosts`. Every name carries a run id,
//! so a run that crashed before cleaning up cannot collide with the next; everything
//! made is removed on drop, a failed assertion included.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Runs `ip args...`; the error says what failed and why.
fn ip(bin: &Path, args: &[&str]) -> Result<(), String> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether this process can make network namespaces: root, an `ip` binary, and a
/// trial namespace that can be added, given a hosts file, entered with `ip netns
/// exec`, and deleted. The error says what failed.
pub fn usable(bin: Option<&Path>) -> Result<(), String> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root".into());
    }
    let bin = bin.ok_or("no `ip` on PATH")?;
    let trial = format!("spur-trial-{}", run_id());
    ip(bin, &["netns", "add", &trial])?;
    let dir = hosts_dir(&trial);
    let tried = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(dir.join("hosts"), "127.0.0.1\tlocalhost\n"))
        .map_err(|e| format!("{}: {e}", dir.display()))
        .and_then(|()| ip(bin, &["netns", "exec", &trial, "true"]));
    let _ = std::fs::remove_dir_all(&dir);
    let deleted = ip(bin, &["netns", "del", &trial]);
    tried.and(deleted)
}

/// A short id for this run's names (interface names are at most 15 bytes).
fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{:06x}", (std::process::id() ^ nanos) & 0xff_ffff)
}

/// The bridge, the namespaces and their hosts files of one rehearsal.
pub struct Network {
    ip: PathBuf,
    id: String,
    bridge: String,
    /// The first three octets of the pods' /24.
    pub subnet: String,
    namespaces: Vec<String>,
}

impl Network {
    /// Makes the bridge on a /24 of 10.244.0.0/16 that no route of this machine uses.
    pub fn new(ip_bin: &Path) -> Result<Self, String> {
        let id = run_id();
        let routes = Command::new(ip_bin)
            .args(["-4", "route"])
            .output()
            .map_err(|e| format!("ip -4 route: {e}"))?;
        let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
        let start = u32::from_str_radix(&id, 16).unwrap_or(0) % 250;
        let subnet = (0..250)
            .map(|i| format!("10.244.{}", (start + i) % 250 + 1))
            .find(|s| !routes.contains(&format!("{s}.")))
            .ok_or("every 10.244.x.0/24 is routed already")?;
        let net = Self {
            ip: ip_bin.to_path_buf(),
            bridge: format!("spb{id}"),
            id,
            subnet,
            namespaces: vec![],
        };
        net.ip(&["link", "add", &net.bridge, "type", "bridge"])?;
        net.ip(&[
            "addr",
            "add",
            &format!("{}.1/24", net.subnet),
            "dev",
            &net.bridge,
        ])?;
        net.ip(&["link", "set", &net.bridge, "up"])?;
        Ok(net)
    }

    fn ip(&self, args: &[&str]) -> Result<(), String> {
        ip(&self.ip, args)
    }

    /// The namespace name of `pod` in this run.
    pub fn namespace(&self, pod: &str) -> String {
        format!("spur-{}-{pod}", self.id)
    }

    /// Makes `pod`'s namespace with `addr` on its `eth0`, loopback up, and `hosts`
    /// as its `/etc/hosts`; returns the namespace's name.
    pub fn add_pod(&mut self, pod: &str, addr: &str, hosts: &str) -> Result<String, String> {
        let ns = self.namespace(pod);
        self.ip(&["netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        let dir = hosts_dir(&ns);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        std::fs::write(dir.join("hosts"), hosts).map_err(|e| format!("hosts of {ns}: {e}"))?;
        let veth = format!("spv{}{}", self.id, self.namespaces.len());
        self.ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        self.ip(&["link", "set", &veth, "master", &self.bridge, "up"])?;
        self.ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        self.ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        self.ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A command that runs `program` in namespace `ns` (with its hosts file).
    pub fn exec(&self, ns: &str, program: &Path) -> Command {
        let mut cmd = Command::new(&self.ip);
        cmd.args(["netns", "exec", ns]).arg(program);
        cmd
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth pair, and with it the other.
        for ns in &self.namespaces {
            if let Err(e) = self.ip(&["netns", "del", ns]) {
                eprintln!("cleanup: {e}");
            }
            let _ = std::fs::remove_dir_all(hosts_dir(ns));
        }
        if let Err(e) = self.ip(&["link", "del", &self.bridge]) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// Where `ip netns exec` finds the files it mounts over `/etc` for namespace `ns`.
fn hosts_dir(ns: &str) -> PathBuf {
    Path::new("/etc/netns").join(ns)
}

/// Opens a TCP connection to `addr` from inside namespace `ns` (a thread that joins
/// it; the rest of the process stays where it is).
pub fn connect_from(ns: &str, addr: SocketAddr) -> std::io::Result<()> {
    let path = Path::new("/var/run/netns").join(ns);
    std::thread::spawn(move || {
        let handle = std::fs::File::open(path)?;
        // SAFETY: setns(2) with an open namespace file; it moves this thread only.
        if unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map(drop)
    })
    .join()
    .expect("the connecting thread does not panic")
}
