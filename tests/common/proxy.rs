//! A TCP proxy for the LAN robustness tests (tests/robust.rs): it forwards bytes between a client and a real
//! `fastsync serve`, and breaks connections on purpose once they have carried a given number of bytes: it resets
//! them (an RST to the client, a FIN to the server, after a short pause in which the client can read what it was
//! sent) or stalls them (stops forwarding in both directions and keeps both sockets open, so only a timeout can tell).

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// How a connection is broken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Cut: an RST to the client, a FIN to the server.
    Reset,
    /// Forward nothing more, either way, and keep both sockets open.
    Stall,
}

/// Which connections are broken, and when.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub fault: Fault,
    /// A connection is broken once it has carried this many bytes (both directions together; the bytes beyond it
    /// are not forwarded).
    pub after_bytes: u64,
    /// How many connections are broken in all (the first ones to reach `after_bytes`); `usize::MAX`: every one.
    pub times: usize,
    /// Only this connection (1-based, in the order they were accepted) may be broken.
    pub only_connection: Option<usize>,
    /// Count only the bytes from the server to the client (to cut just before a given answer).
    pub down_only: bool,
    /// Hold every read (at most 64 KiB) this long before forwarding it, each direction: a long path whose
    /// connections each carry at most 64 KiB per delay, as a window-limited TCP connection over a long RTT does.
    pub delay: Option<Duration>,
}

impl Plan {
    /// Break the first `times` connections that carry `after_bytes`, counting both directions.
    pub fn new(fault: Fault, after_bytes: u64, times: usize) -> Plan {
        Plan { fault, after_bytes, times, only_connection: None, down_only: false, delay: None }
    }

    /// Break nothing; delay every read by `delay` before forwarding it.
    pub fn long_path(delay: Duration) -> Plan {
        Plan { delay: Some(delay), ..Plan::new(Fault::Reset, u64::MAX, 0) }
    }
}

/// How often a blocked pump looks at the flags.
const TICK: Duration = Duration::from_millis(20);
/// How long a connection to be reset is stalled first.
const RESET_GRACE: Duration = Duration::from_millis(300);

struct Shared {
    upstream: String,
    plan: Plan,
    faults: AtomicUsize,
    connections: AtomicUsize,
    /// Connections not yet closed on both sides.
    open: AtomicUsize,
    /// Bytes forwarded client → server and server → client.
    up_bytes: AtomicU64,
    down_bytes: AtomicU64,
    /// Reads forwarded from clients to the server, and from the server to clients: one per burst of requests or
    /// answers that the other side waited for.
    up_reads: AtomicU64,
    down_reads: AtomicU64,
    shutdown: AtomicBool,
}

impl Shared {
    /// Take one fault from the plan's budget.
    fn claim(&self) -> bool {
        self.faults.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < self.plan.times).then_some(n + 1)).is_ok()
    }
}

/// One proxied connection.
struct Link {
    /// 1-based, in accept order.
    number: usize,
    client: TcpStream,
    server: TcpStream,
    bytes: AtomicU64,
    faulted: AtomicBool,
    stalled: AtomicBool,
    /// Both pumps stop (a reset, or a socket error).
    dead: AtomicBool,
}

/// A proxy on 127.0.0.1:0 in front of `upstream`; it stops (and closes every connection) when dropped.
pub struct Proxy {
    pub port: u16,
    shared: Arc<Shared>,
}

impl Proxy {
    pub fn start(upstream: &str, plan: Plan) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let shared = Arc::new(Shared {
            upstream: upstream.to_string(),
            plan,
            faults: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            up_bytes: AtomicU64::new(0),
            down_bytes: AtomicU64::new(0),
            up_reads: AtomicU64::new(0),
            down_reads: AtomicU64::new(0),
            shutdown: AtomicBool::new(false),
        });
        let s = shared.clone();
        std::thread::spawn(move || accept_loop(&listener, &s));
        Proxy { port, shared }
    }

    /// `127.0.0.1:PORT`, as the client names the server in its messages.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `fastsync://127.0.0.1:PORT/path`.
    pub fn url(&self, path: &str) -> String {
        format!("fastsync://127.0.0.1:{}/{path}", self.port)
    }

    /// Connections broken so far.
    pub fn faults(&self) -> usize {
        self.shared.faults.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Connections still open (a client that is gone may have bytes still on the way to the server).
    pub fn open(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Bytes forwarded from clients to the server.
    pub fn up_bytes(&self) -> u64 {
        self.shared.up_bytes.load(Ordering::SeqCst)
    }

    /// Bytes forwarded from the server to clients.
    pub fn down_bytes(&self) -> u64 {
        self.shared.down_bytes.load(Ordering::SeqCst)
    }

    /// Reads forwarded from clients to the server (a client that waits for each answer before it asks again makes
    /// at least one per request).
    pub fn up_reads(&self) -> u64 {
        self.shared.up_reads.load(Ordering::SeqCst)
    }

    /// Reads forwarded from the server to clients (at least one per answer a client waited for).
    pub fn down_reads(&self) -> u64 {
        self.shared.down_reads.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    while !shared.shutdown.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(TICK);
                continue;
            }
            Err(_) => return,
        };
        let number = shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
        let Ok(server) = TcpStream::connect(&shared.upstream) else { continue };
        let shared = shared.clone();
        shared.open.fetch_add(1, Ordering::SeqCst);
        std::thread::spawn(move || {
            proxy_connection(number, client, server, &shared);
            shared.open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

fn proxy_connection(number: usize, client: TcpStream, server: TcpStream, shared: &Arc<Shared>) {
    for s in [&client, &server] {
        s.set_nonblocking(false).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(TICK)).unwrap();
    }
    let link = Arc::new(Link {
        number,
        client,
        server,
        bytes: AtomicU64::new(0),
        faulted: AtomicBool::new(false),
        stalled: AtomicBool::new(false),
        dead: AtomicBool::new(false),
    });
    let (l, s) = (link.clone(), shared.clone());
    let down = std::thread::spawn(move || pump(&l, &s, false));
    pump(&link, shared, true);
    let _ = down.join();
    // Both pumps are done: the last reference closes the sockets (with an RST to a reset client).
}

/// Forward one direction (`up`: client → server) until an end, a fault or the proxy's shutdown.
fn pump(link: &Link, shared: &Shared, up: bool) {
    let (from, to) = if up { (&link.client, &link.server) } else { (&link.server, &link.client) };
    let counter = if up { &shared.up_bytes } else { &shared.down_bytes };
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if shared.shutdown.load(Ordering::SeqCst) || link.dead.load(Ordering::SeqCst) {
            return;
        }
        if link.stalled.load(Ordering::SeqCst) {
            std::thread::sleep(TICK);
            continue;
        }
        let n = match (&*from).read(&mut buf) {
            Ok(0) => {
                // An orderly end: pass it on (unless this is the end of a reset), and let the other direction drain.
                if !link.dead.load(Ordering::SeqCst) {
                    let _ = to.shutdown(Shutdown::Write);
                }
                return;
            }
            Ok(n) => n as u64,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                continue;
            }
            Err(_) => {
                link.dead.store(true, Ordering::SeqCst);
                return;
            }
        };
        let plan = &shared.plan;
        if let Some(d) = plan.delay {
            std::thread::sleep(d);
        }
        let counted = !(up && plan.down_only);
        let eligible = counted && plan.only_connection.is_none_or(|k| k == link.number);
        let before = if counted { link.bytes.fetch_add(n, Ordering::SeqCst) } else { 0 };
        let fault =
            eligible && before + n > plan.after_bytes && !link.faulted.swap(true, Ordering::SeqCst) && shared.claim();
        let forward = if fault { plan.after_bytes.saturating_sub(before).min(n) } else { n };
        if (&*to).write_all(&buf[..forward as usize]).is_err() {
            link.dead.store(true, Ordering::SeqCst);
            return;
        }
        counter.fetch_add(forward, Ordering::SeqCst);
        let reads = if up { &shared.up_reads } else { &shared.down_reads };
        reads.fetch_add(1, Ordering::SeqCst);
        if !fault {
            continue;
        }
        match shared.plan.fault {
            Fault::Reset => {
                // Give the client time to read what was forwarded: an RST makes its kernel drop unread bytes, and
                // the test wants to see which bytes a client sends or asks for again, not the kernel's losses.
                link.stalled.store(true, Ordering::SeqCst);
                std::thread::sleep(RESET_GRACE);
                link.dead.store(true, Ordering::SeqCst);
                reset_on_close(&link.client);
                let _ = link.server.shutdown(Shutdown::Both);
                return;
            }
            Fault::Stall => link.stalled.store(true, Ordering::SeqCst),
        }
    }
}

/// `SO_LINGER` with a zero timeout: closing the socket sends an RST instead of a FIN.
fn reset_on_close(s: &TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket descriptor and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
