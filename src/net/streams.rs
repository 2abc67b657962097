//! How many parallel connections a transfer should use: from the measured bandwidth-delay product, adjusted while it runs.
//!
//! Every second the client samples its data connections: bytes delivered so far, the kernel's smoothed round-trip
//! time and its count of retransmitted segments (`TCP_INFO`). The [`StreamPolicy`] turns the samples into a
//! target number of streams, following the architecture document's rules:
//! - enough data in flight to fill the pipe: `target = BDP / chunk` where `BDP = throughput × RTT`;
//! - a long path (RTT above 50 ms) gets more streams, up to the maximum, a short one (below 10 ms) settles at the
//!   minimum: one TCP connection's window covers a LAN's BDP many times over;
//! - retransmissions since the last sample (loss: more than 1% of the segments sent) take a quarter of the streams
//!   away; a burst (more than 5%) halves them, since more connections would only push harder into a congested path;
//! - growth must pay: after the streams grow, throughput is measured again two samples later, and when it did not
//!   rise by at least 10% the streams go back to what they were, and stay there for a while. A long RTT that comes
//!   from a full queue (a bottleneck, not distance) or a receiver that is CPU-bound thus stops the growth at once.
//!
//! The policy is pure arithmetic (no I/O, no clock of its own), so that it is tested with synthetic samples.

use std::time::Duration;

/// Fewest streams a transfer uses once adjusted (also the default before any measurement).
pub const STREAMS_MIN: usize = 4;
/// Most streams a transfer opens.
pub const STREAMS_MAX: usize = 32;
/// RTT above which a path counts as long.
const RTT_LONG: Duration = Duration::from_millis(50);
/// RTT below which a path counts as short.
const RTT_SHORT: Duration = Duration::from_millis(10);
/// Retransmitted segments, per mille of those sent in a sample, that count as loss.
const LOSS_PER_MILLE_MIN: u64 = 10;
/// Samples taken after a growth before its effect is judged (new connections need a few RTTs to open their window).
const PROBE_SAMPLES: u32 = 2;
/// The gain in throughput a growth must bring to be kept.
const PROBE_GAIN_MIN: f64 = 1.10;
/// After a growth that did not pay, no growth beyond that level for this long.
const PROBE_HOLD_SECS: f64 = 10.0;

/// A growth being judged: the streams before it and the throughput they gave.
#[derive(Clone, Copy, Debug)]
struct Probe {
    from: usize,
    throughput: f64,
    samples: u32,
}

/// What the client measured over its data connections, cumulatively, at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sample {
    /// Seconds since the transfer started.
    pub at_secs: f64,
    /// Payload bytes delivered (acknowledged) so far, all streams together.
    pub bytes: u64,
    /// Smoothed RTT, the largest over the streams (the slowest path decides).
    pub rtt: Duration,
    /// Segments sent and retransmitted so far, all streams together.
    pub segments_sent: u64,
    pub segments_retransmitted: u64,
}

/// Turns samples into a target number of streams.
#[derive(Clone, Debug)]
pub struct StreamPolicy {
    min: usize,
    max: usize,
    /// Bytes of one unit of work in flight per stream (a chunk).
    chunk_bytes: u64,
    last: Option<Sample>,
    /// Exponential moving averages (weight 1/2 for a new value: a growth is judged two samples later).
    throughput_bytes_per_s: Option<f64>,
    rtt_secs: Option<f64>,
    target: usize,
    probe: Option<Probe>,
    /// No growth above `ceiling.0` until `ceiling.1` (seconds since the start).
    ceiling: Option<(usize, f64)>,
}

impl StreamPolicy {
    pub fn new(min: usize, max: usize, chunk_bytes: u64) -> StreamPolicy {
        let min = min.clamp(1, max.max(1));
        StreamPolicy {
            min,
            max: max.max(min),
            chunk_bytes: chunk_bytes.max(1),
            last: None,
            throughput_bytes_per_s: None,
            rtt_secs: None,
            target: min,
            probe: None,
            ceiling: None,
        }
    }

    /// The current target.
    pub fn target(&self) -> usize {
        self.target
    }

    /// The throughput measured so far (moving average), in bytes per second.
    pub fn throughput_bytes_per_s(&self) -> Option<f64> {
        self.throughput_bytes_per_s
    }

    /// The bandwidth-delay product estimated so far, in bytes.
    pub fn bdp_bytes(&self) -> Option<f64> {
        Some(self.throughput_bytes_per_s? * self.rtt_secs?)
    }

    /// Take a new sample and return the new target.
    pub fn observe(&mut self, s: Sample) -> usize {
        let Some(last) = self.last.replace(s) else {
            self.rtt_secs = Some(s.rtt.as_secs_f64());
            return self.target;
        };
        let dt = s.at_secs - last.at_secs;
        if dt <= 0.0 {
            return self.target;
        }
        let ema = |old: Option<f64>, new: f64| Some(old.map_or(new, |o| o + (new - o) / 2.0));
        let delivered = s.bytes.saturating_sub(last.bytes) as f64 / dt;
        self.throughput_bytes_per_s = ema(self.throughput_bytes_per_s, delivered);
        self.rtt_secs = ema(self.rtt_secs, s.rtt.as_secs_f64());
        let throughput = self.throughput_bytes_per_s.unwrap_or(0.0);

        let sent = s.segments_sent.saturating_sub(last.segments_sent);
        let lost = s.segments_retransmitted.saturating_sub(last.segments_retransmitted);
        if lost * 1000 > sent * LOSS_PER_MILLE_MIN {
            // Loss: back off, harder when it is a burst. (A few retransmissions are no loss: tail-loss probes and
            // spurious timeouts retransmit now and then on any path.)
            let burst = lost * 20 > sent;
            let next = if burst { self.target / 2 } else { self.target - self.target / 4 };
            self.target = next.clamp(self.min, self.max);
            self.probe = None;
            return self.target;
        }
        if let Some(mut p) = self.probe.take() {
            p.samples += 1;
            if p.samples < PROBE_SAMPLES {
                self.probe = Some(p);
                return self.target;
            }
            if throughput < p.throughput * PROBE_GAIN_MIN {
                // More streams did not move more bytes: go back, and do not try again for a while.
                self.target = p.from;
                self.ceiling = Some((p.from, s.at_secs + PROBE_HOLD_SECS));
                return self.target;
            }
        }
        let rtt = Duration::from_secs_f64(self.rtt_secs.unwrap_or(0.0));
        let by_bdp = self.bdp_bytes().map_or(self.min, |bdp| (bdp / self.chunk_bytes as f64).ceil() as usize);
        let mut wanted = if rtt < RTT_SHORT {
            self.min
        } else if rtt > RTT_LONG {
            // A long path: open more, at least double what we have, as the BDP estimate itself is limited by the
            // streams we already have open.
            by_bdp.max(self.target * 2)
        } else if by_bdp >= self.target {
            // Every stream has a chunk's worth in flight: the pipe may hold more, try (the probe decides).
            self.target * 2
        } else {
            by_bdp
        };
        if let Some((cap, until)) = self.ceiling {
            if s.at_secs < until {
                wanted = wanted.min(cap);
            } else {
                self.ceiling = None;
            }
        }
        // Grow at most by doubling per sample, shrink by a quarter: ramp up fast, back off gently.
        let next = wanted.clamp(self.target - self.target / 4, self.target * 2).clamp(self.min, self.max);
        if next > self.target {
            self.probe = Some(Probe { from: self.target, throughput, samples: 0 });
        }
        self.target = next;
        self.target
    }
}

/// What the kernel knows of one TCP connection.
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpStats {
    pub rtt: Duration,
    /// Payload bytes acknowledged by the peer plus bytes received from it.
    pub bytes: u64,
    pub segments_sent: u64,
    pub segments_retransmitted: u64,
}

/// `TCP_INFO` of a connected socket (Linux), or `None` where the kernel does not say.
#[cfg(target_os = "linux")]
pub fn tcp_stats(fd: std::os::fd::RawFd) -> Option<TcpStats> {
    // SAFETY: an all-zero tcp_info is valid; the kernel fills at most `len` bytes of it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: valid descriptor and out-pointers of the right size.
    let rc = unsafe {
        libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, (&mut info as *mut libc::tcp_info).cast(), &mut len)
    };
    if rc != 0 {
        return None;
    }
    Some(TcpStats {
        rtt: Duration::from_micros(info.tcpi_rtt as u64),
        bytes: info.tcpi_bytes_acked.saturating_add(info.tcpi_bytes_received),
        segments_sent: info.tcpi_segs_out as u64,
        segments_retransmitted: info.tcpi_total_retrans as u64,
    })
}

#[cfg(not(target_os = "linux"))]
pub fn tcp_stats(_fd: std::os::fd::RawFd) -> Option<TcpStats> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Feed `secs` one-second samples of a path where each stream moves `per_stream` bytes/s, up to `cap` in all.
    fn run(policy: &mut StreamPolicy, rtt_ms: u64, per_stream: u64, cap: u64, secs: usize) -> usize {
        for _ in 0..secs {
            let last = policy.last.unwrap_or_default();
            let rate = (per_stream * policy.target() as u64).min(cap);
            policy.observe(Sample {
                at_secs: last.at_secs + 1.0,
                bytes: last.bytes + rate,
                rtt: Duration::from_millis(rtt_ms),
                segments_sent: last.segments_sent + 1000,
                segments_retransmitted: last.segments_retransmitted,
            });
        }
        policy.target()
    }

    #[test]
    fn lan_stays_at_the_minimum() {
        let mut p = StreamPolicy::new(4, 32, 4 * MIB);
        assert_eq!(run(&mut p, 0, 300 * MIB, 1200 * MIB, 10), 4);
    }

    #[test]
    fn long_fat_path_grows_while_it_pays() {
        // 80 ms, each stream limited to 40 MB/s by its window, 2 GB/s in all: the streams grow by doubling (each
        // step judged two samples later) up to the maximum, since every step brings more.
        let mut p = StreamPolicy::new(4, 32, 4 * MIB);
        let mut seen = vec![p.target()];
        for _ in 0..20 {
            seen.push(run(&mut p, 80, 40 * MIB, 2000 * MIB, 1));
        }
        assert!(seen.windows(2).all(|w| w[1] <= w[0] * 2), "grows at most by doubling: {seen:?}");
        assert_eq!(*seen.last().unwrap(), 32, "{seen:?}");
    }

    #[test]
    fn growth_that_does_not_pay_is_undone() {
        // 80 ms but a 100 MB/s bottleneck that 4 streams already fill: one doubling is tried, then undone, and
        // not tried again for a while.
        let mut p = StreamPolicy::new(4, 32, 4 * MIB);
        let mut seen = vec![p.target()];
        for _ in 0..8 {
            seen.push(run(&mut p, 80, 30 * MIB, 100 * MIB, 1));
        }
        assert!(seen.contains(&8), "{seen:?}");
        assert_eq!(*seen.last().unwrap(), 4, "{seen:?}");
        assert!(seen[4..].iter().all(|&t| t == 4), "held back after a failed probe: {seen:?}");
    }

    #[test]
    fn medium_path_follows_the_bdp() {
        // 20 ms, 250 MB/s: BDP 5 MB, 2 chunks: the minimum holds.
        let mut p = StreamPolicy::new(4, 32, 4 * MIB);
        assert_eq!(run(&mut p, 20, 100 * MIB, 250 * MIB, 10), 4);
        // 40 ms, up to 2 GB/s at 100 MB/s per stream: BDP 80 MB = 20 chunks.
        let mut p = StreamPolicy::new(4, 32, 4 * MIB);
        let t = run(&mut p, 40, 100 * MIB, 2000 * MIB, 30);
        assert!((16..=24).contains(&t), "{t}");
    }

    #[test]
    fn loss_backs_off_and_bursts_halve() {
        let mut p = StreamPolicy::new(4, 32, 4 * MIB);
        run(&mut p, 100, 40 * MIB, 4000 * MIB, 20);
        assert_eq!(p.target(), 32);
        let last = p.last.unwrap();
        // Loss (2% of segments): a quarter fewer.
        let s = Sample {
            at_secs: last.at_secs + 1.0,
            bytes: last.bytes + 1000 * MIB,
            rtt: Duration::from_millis(100),
            segments_sent: last.segments_sent + 10_000,
            segments_retransmitted: last.segments_retransmitted + 200,
        };
        assert_eq!(p.observe(s), 24);
        // A burst (10%): half.
        let s2 = Sample {
            at_secs: s.at_secs + 1.0,
            bytes: s.bytes + 1000 * MIB,
            segments_sent: s.segments_sent + 10_000,
            segments_retransmitted: s.segments_retransmitted + 1000,
            ..s
        };
        assert_eq!(p.observe(s2), 12);
        // A stray retransmission (0.5%) is no loss.
        let s3 = Sample {
            at_secs: s2.at_secs + 1.0,
            segments_sent: s2.segments_sent + 200,
            segments_retransmitted: s2.segments_retransmitted + 1,
            ..s2
        };
        assert!(p.observe(s3) >= 12);
        // Never below the minimum.
        let mut q = StreamPolicy::new(4, 32, 4 * MIB);
        let s4 = Sample { at_secs: 1.0, segments_sent: 100, segments_retransmitted: 50, ..Default::default() };
        q.observe(Sample::default());
        assert_eq!(q.observe(s4), 4);
    }

    #[test]
    fn samples_out_of_order_change_nothing() {
        let mut p = StreamPolicy::new(4, 32, 4 * MIB);
        p.observe(Sample { at_secs: 2.0, ..Default::default() });
        assert_eq!(p.observe(Sample { at_secs: 1.0, bytes: u64::MAX, ..Default::default() }), 4);
    }

    #[test]
    fn tcp_info_of_a_real_connection() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let _s = l.accept().unwrap();
        use std::os::fd::AsRawFd;
        let st = tcp_stats(c.as_raw_fd());
        if cfg!(target_os = "linux") {
            let st = st.expect("TCP_INFO on Linux");
            assert!(st.rtt < Duration::from_secs(1));
        }
    }
}
