//! The socket jobs' contract (`fastsync_engine::net`), run against both engines over real TCP loopback connections:
//! frames sent and received, checked against what the peer saw, digest mismatches, a peer that closes or stalls,
//! a file that is shorter than asked, O_DIRECT writes, cancellation.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

mod common;

use common::random_bytes;
use fastsync_engine::net::{HEAD_ROOM_BYTES, HeadFn};
use fastsync_engine::{Completion, Engine, EngineConfig, Job, Op, Outcome, RecvJob, SendJob, Session, Submitter};
use fastsync_fallback::FallbackEngine;
use fastsync_uring::UringEngine;

const BLOCK_BYTES: usize = 1 << 20;

/// A directory removed at the end of the test.
fn tempdir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("fastsync-engine-net-{name}-")).tempdir().unwrap()
}

fn start(engine: &dyn Engine) -> Session {
    let config = EngineConfig {
        shards: 2,
        pin: false,
        block_bytes: BLOCK_BYTES,
        slots_per_shard: 2,
        jobs_in_flight_max: 8,
        buffered_writes_nonblocking: false,
        buffers_up_front: false,
    };
    engine.start(&config).unwrap()
}

/// A connected pair of TCP sockets on loopback: (ours, the peer's).
fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let ours = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (peer, _) = l.accept().unwrap();
    (ours, peer)
}

/// Submit one socket job and wait for its completion.
fn run(sub: &Submitter, job: impl FnOnce(crossbeam_channel::Sender<Completion>) -> Job) -> Completion {
    let (tx, rx) = crossbeam_channel::bounded(1);
    sub.submit(job(tx)).unwrap();
    rx.recv_timeout(Duration::from_secs(60)).expect("a completion within 60 s")
}

/// A new, empty file `dst` in `dir`, open for reading and writing.
fn dst_file(dir: &tempfile::TempDir) -> (std::path::PathBuf, File) {
    let path = dir.path().join("dst");
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    (path, file)
}

/// A head like the protocol's: a marker, the length and the digest.
fn head() -> HeadFn {
    Box::new(|digest: &[u8; 32], len: usize| {
        let mut h = b"HEAD".to_vec();
        h.extend_from_slice(&(len as u64).to_le_bytes());
        h.extend_from_slice(digest);
        h
    })
}

const HEAD_BYTES: usize = 4 + 8 + 32;

#[allow(clippy::too_many_arguments)]
fn send_job(
    tx: crossbeam_channel::Sender<Completion>,
    sock: &TcpStream,
    file: &File,
    path: &Path,
    offset: u64,
    len: u64,
    zerocopy: bool,
    timeout: Duration,
) -> Job {
    Job::Send(SendJob {
        tag: 7,
        sock: sock.as_raw_fd(),
        file: file.as_raw_fd(),
        path: path.to_path_buf(),
        offset,
        len,
        head: head(),
        timeout,
        zerocopy,
        reply: tx,
    })
}

#[allow(clippy::too_many_arguments)]
fn recv_job(
    tx: crossbeam_channel::Sender<Completion>,
    sock: &TcpStream,
    file: &File,
    path: &Path,
    offset: u64,
    payload: &[u8],
    prefix: usize,
    timeout: Duration,
) -> Job {
    Job::Recv(RecvJob {
        tag: 9,
        sock: sock.as_raw_fd(),
        file: file.as_raw_fd(),
        direct: None,
        path: path.to_path_buf(),
        offset,
        len: payload.len() as u64,
        prefix: payload[..prefix].to_vec(),
        digest: *blake3::hash(payload).as_bytes(),
        timeout,
        gate: None,
        reply: tx,
    })
}

fn failed(c: Completion) -> fastsync_engine::JobError {
    match c.outcome {
        Outcome::Failed(e) => e,
        other => panic!("expected a failure, got {other:?}"),
    }
}

const LONG: Duration = Duration::from_secs(30);

/// Frames go out whole: head then payload, the digest that of the payload, on both the copying and (uring) the
/// zero-copy send; the peer reads them with plain `read`.
fn sends_head_and_payload(engine: &dyn Engine) {
    let dir = tempdir("send");
    let path = dir.path().join("src");
    let data = random_bytes(1, 900 << 10);
    fs::write(&path, &data).unwrap();
    let file = File::open(&path).unwrap();
    let session = start(engine);
    let sub = session.submitter();
    let (ours, mut peer) = pair();
    for (i, zerocopy) in [false, engine.capabilities().zerocopy_send].into_iter().enumerate() {
        let (offset, len) = (1000 + i as u64 * 4096, 600 << 10);
        let c = run(&sub, |tx| send_job(tx, &ours, &file, &path, offset, len, zerocopy, LONG));
        let want = &data[offset as usize..(offset + len) as usize];
        match c.outcome {
            Outcome::Moved { digest, bytes } => {
                assert_eq!(bytes, len);
                assert_eq!(digest, *blake3::hash(want).as_bytes());
            }
            other => panic!("send failed: {other:?}"),
        }
        let mut got = vec![0u8; HEAD_BYTES + len as usize];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got[..4], b"HEAD");
        assert_eq!(u64::from_le_bytes(got[4..12].try_into().unwrap()), len);
        assert_eq!(&got[12..HEAD_BYTES], blake3::hash(want).as_bytes());
        assert!(got[HEAD_BYTES..] == *want, "payload differs (zerocopy {zerocopy})");
    }
}

/// A file shorter than asked: the frame carries what there is (complete, with its digest), and a range past the end
/// sends nothing at all.
fn short_file_sends_what_there_is(engine: &dyn Engine) {
    let dir = tempdir("short");
    let path = dir.path().join("src");
    let data = random_bytes(2, 100_000);
    fs::write(&path, &data).unwrap();
    let file = File::open(&path).unwrap();
    let session = start(engine);
    let sub = session.submitter();
    let (ours, mut peer) = pair();
    let c = run(&sub, |tx| send_job(tx, &ours, &file, &path, 60_000, 500_000, false, LONG));
    assert!(matches!(c.outcome, Outcome::Moved { bytes: 40_000, .. }), "{:?}", c.outcome);
    let c = run(&sub, |tx| send_job(tx, &ours, &file, &path, 200_000, 1000, false, LONG));
    assert!(matches!(c.outcome, Outcome::Moved { bytes: 0, .. }), "{:?}", c.outcome);
    drop(ours);
    let mut got = Vec::new();
    peer.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), HEAD_BYTES + 40_000, "one frame, and nothing for the range past the end");
    assert_eq!(u64::from_le_bytes(got[4..12].try_into().unwrap()), 40_000);
    assert!(got[HEAD_BYTES..] == data[60_000..]);
}

/// A payload, part of which the caller had already read, is checked and written at its offset.
fn receives_checks_and_writes(engine: &dyn Engine) {
    let dir = tempdir("recv");
    let (path, file) = dst_file(&dir);
    file.set_len(2 << 20).unwrap();
    let session = start(engine);
    let sub = session.submitter();
    let (ours, mut peer) = pair();
    let payload = random_bytes(3, 700_001);
    let sender = {
        let (payload, mut peer) = (payload.clone(), peer.try_clone().unwrap());
        std::thread::spawn(move || peer.write_all(&payload[1234..]).unwrap())
    };
    let c = run(&sub, |tx| recv_job(tx, &ours, &file, &path, 5000, &payload, 1234, LONG));
    sender.join().unwrap();
    match c.outcome {
        Outcome::Moved { digest, bytes } => {
            assert_eq!(bytes, payload.len() as u64);
            assert_eq!(digest, *blake3::hash(&payload).as_bytes());
        }
        other => panic!("receive failed: {other:?}"),
    }
    let mut back = vec![0u8; payload.len()];
    file.read_exact_at(&mut back, 5000).unwrap();
    assert!(back == payload);
    // The connection is in step: what the peer sends next is what we read next.
    peer.write_all(b"next").unwrap();
    let mut next = [0u8; 4];
    (&ours).read_exact(&mut next).unwrap();
    assert_eq!(&next, b"next");
}

/// The gate decides, after the payload was checked, whether it is written: refused, nothing is written and the
/// job completes with 0 bytes (and the connection is in step); allowed, the bytes are written.
fn the_gate_decides_whether_a_checked_payload_is_written(engine: &dyn Engine) {
    let dir = tempdir("gate");
    let (path, file) = dst_file(&dir);
    file.set_len(1 << 20).unwrap();
    let session = start(engine);
    let sub = session.submitter();
    let (ours, mut peer) = pair();
    let payload = random_bytes(12, 200_000);
    for allow in [false, true] {
        peer.write_all(&payload).unwrap();
        let asked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let c = run(&sub, |tx| {
            let mut j = recv_job(tx, &ours, &file, &path, 4096, &payload, 0, LONG);
            let asked = asked.clone();
            if let Job::Recv(r) = &mut j {
                r.gate = Some(Box::new(move || {
                    asked.store(true, Ordering::SeqCst);
                    allow
                }));
            }
            j
        });
        assert!(asked.load(Ordering::SeqCst), "the gate was asked");
        let want = if allow { payload.len() as u64 } else { 0 };
        assert!(matches!(c.outcome, Outcome::Moved { bytes, .. } if bytes == want), "{:?}", c.outcome);
        let got = fs::read(&path).unwrap();
        if allow {
            assert!(got[4096..4096 + payload.len()] == payload);
        } else {
            assert!(got.iter().all(|&b| b == 0), "a refused payload is not written");
        }
    }
}

/// A payload whose digest does not match is consumed (the connection stays in step) and never written.
fn digest_mismatch_writes_nothing(engine: &dyn Engine) {
    let dir = tempdir("mismatch");
    let (path, file) = dst_file(&dir);
    file.set_len(1 << 20).unwrap();
    let session = start(engine);
    let sub = session.submitter();
    let (ours, mut peer) = pair();
    let payload = random_bytes(4, 300_000);
    let mut damaged = payload.clone();
    damaged[150_000] ^= 1;
    peer.write_all(&damaged).unwrap();
    peer.write_all(b"next").unwrap();
    let e = failed(run(&sub, |tx| recv_job(tx, &ours, &file, &path, 0, &payload, 0, LONG)));
    assert_eq!(e.op, Op::Verify, "{e}");
    assert!(e.to_string().contains("does not match"), "{e}");
    assert!(fs::read(&path).unwrap().iter().all(|&b| b == 0), "nothing may be written");
    let mut next = [0u8; 4];
    (&ours).read_exact(&mut next).unwrap();
    assert_eq!(&next, b"next");
}

/// A peer that closes mid-payload fails the job as a connection error.
fn peer_closing_mid_payload_fails(engine: &dyn Engine) {
    let dir = tempdir("closed");
    let (path, file) = dst_file(&dir);
    let session = start(engine);
    let sub = session.submitter();
    let (ours, mut peer) = pair();
    let payload = random_bytes(5, 500_000);
    peer.write_all(&payload[..200_000]).unwrap();
    drop(peer);
    let e = failed(run(&sub, |tx| recv_job(tx, &ours, &file, &path, 0, &payload, 0, LONG)));
    assert_eq!(e.op, Op::Recv, "{e}");
    assert_eq!(e.source.kind(), ErrorKind::UnexpectedEof, "{e}");
    assert_eq!(fs::metadata(&path).unwrap().len(), 0, "nothing may be written");
}

/// A peer that sends nothing (or too little) is detected after the timeout of no progress, not hung on.
fn stalled_peer_times_out(engine: &dyn Engine) {
    let dir = tempdir("stall");
    let (path, file) = dst_file(&dir);
    let session = start(engine);
    let sub = session.submitter();
    let (ours, mut peer) = pair();
    let payload = random_bytes(6, 400_000);
    peer.write_all(&payload[..100_000]).unwrap();
    let t = Instant::now();
    let e = failed(run(&sub, |tx| recv_job(tx, &ours, &file, &path, 0, &payload, 0, Duration::from_millis(400))));
    assert_eq!(e.op, Op::Recv, "{e}");
    assert_eq!(e.source.kind(), ErrorKind::TimedOut, "{e}");
    assert!(t.elapsed() >= Duration::from_millis(350) && t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    drop(peer);
}

/// A peer that sends slowly but steadily is not a stall: the timeout is "no progress for that long", not a deadline
/// for the whole payload (here 1.2 s of trickle against a 400 ms timeout).
fn a_slow_but_moving_peer_is_not_a_stall(engine: &dyn Engine) {
    let dir = tempdir("trickle");
    let (path, file) = dst_file(&dir);
    let session = start(engine);
    let sub = session.submitter();
    let (ours, peer) = pair();
    let payload = random_bytes(13, 120_000);
    let sender = {
        let (payload, mut peer) = (payload.clone(), peer);
        std::thread::spawn(move || {
            for piece in payload.chunks(10_000) {
                std::thread::sleep(Duration::from_millis(100));
                peer.write_all(piece).unwrap();
            }
            peer
        })
    };
    let t = Instant::now();
    let c = run(&sub, |tx| recv_job(tx, &ours, &file, &path, 0, &payload, 0, Duration::from_millis(400)));
    let _peer = sender.join().unwrap();
    assert!(matches!(c.outcome, Outcome::Moved { .. }), "after {:?}: {:?}", t.elapsed(), c.outcome);
    assert!(fs::read(&path).unwrap() == payload);
}

/// A receiver that stops reading stalls a send; it fails with TimedOut after the timeout.
fn stalled_receiver_times_out_a_send(engine: &dyn Engine) {
    let dir = tempdir("stallsend");
    let path = dir.path().join("src");
    let len = BLOCK_BYTES - HEAD_ROOM_BYTES;
    fs::write(&path, random_bytes(7, len)).unwrap();
    let file = File::open(&path).unwrap();
    let session = start(engine);
    let sub = session.submitter();
    let (ours, peer) = pair();
    // Small socket buffers on both ends, so that a peer that never reads blocks the sender.
    for fd in [ours.as_raw_fd(), peer.as_raw_fd()] {
        let small: libc::c_int = 16 << 10;
        for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
            // SAFETY: a valid socket and an int option.
            unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, opt, (&small as *const libc::c_int).cast(), 4) };
        }
    }
    let zerocopy = engine.capabilities().zerocopy_send;
    let mut timed_out = 0;
    for _ in 0..2 {
        let t = Instant::now();
        let c = run(&sub, |tx| send_job(tx, &ours, &file, &path, 0, len as u64, zerocopy, Duration::from_millis(400)));
        let e = failed(c);
        assert_eq!(e.op, Op::Send, "{e}");
        assert_eq!(e.source.kind(), ErrorKind::TimedOut, "{e}");
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        timed_out += 1;
    }
    assert_eq!(timed_out, 2);
    drop(peer);
}

/// A payload larger than a slot (after the head room) fails before the socket is touched.
fn payload_larger_than_a_slot_is_refused(engine: &dyn Engine) {
    let dir = tempdir("large");
    let path = dir.path().join("src");
    fs::write(&path, random_bytes(8, BLOCK_BYTES)).unwrap();
    let file = File::open(&path).unwrap();
    let session = start(engine);
    let sub = session.submitter();
    let (ours, mut peer) = pair();
    let len = (BLOCK_BYTES - HEAD_ROOM_BYTES + 1) as u64;
    let e = failed(run(&sub, |tx| send_job(tx, &ours, &file, &path, 0, len, false, LONG)));
    assert_eq!((e.op, e.source.kind()), (Op::Send, ErrorKind::InvalidInput), "{e}");
    drop(ours);
    let mut got = Vec::new();
    peer.read_to_end(&mut got).unwrap();
    assert!(got.is_empty(), "nothing may be sent");
}

/// With a direct descriptor, the aligned part goes through it and the ragged end through the page cache; the file
/// holds exactly the payload.
fn receives_into_a_direct_descriptor(engine: &dyn Engine) {
    let dir = tempdir("direct");
    let (path, file) = dst_file(&dir);
    let Ok(direct) = OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(&path) else {
        eprintln!("no O_DIRECT on {}: skipped", path.display());
        return;
    };
    let session = start(engine);
    let sub = session.submitter();
    let (ours, mut peer) = pair();
    let payload = random_bytes(9, 3 * 4096 + 100);
    peer.write_all(&payload).unwrap();
    let c = run(&sub, |tx| {
        let mut j = recv_job(tx, &ours, &file, &path, 8192, &payload, 0, LONG);
        if let Job::Recv(r) = &mut j {
            r.direct = Some(direct.as_raw_fd());
        }
        j
    });
    assert!(matches!(c.outcome, Outcome::Moved { .. }), "{:?}", c.outcome);
    let got = fs::read(&path).unwrap();
    assert_eq!(got.len(), 8192 + payload.len());
    assert!(got[8192..] == payload);
}

/// After a cancel, a socket job completes as interrupted without touching the socket.
fn cancelled_jobs_leave_the_socket_alone(engine: &dyn Engine) {
    let dir = tempdir("cancel");
    let path = dir.path().join("src");
    fs::write(&path, random_bytes(10, 10_000)).unwrap();
    let file = File::open(&path).unwrap();
    let session = start(engine);
    let sub = session.submitter();
    session.cancel();
    let (ours, mut peer) = pair();
    let e = failed(run(&sub, |tx| send_job(tx, &ours, &file, &path, 0, 10_000, false, LONG)));
    assert_eq!(e.op, Op::Interrupted, "{e}");
    drop(ours);
    let mut got = Vec::new();
    peer.read_to_end(&mut got).unwrap();
    assert!(got.is_empty());
}

/// Many socket jobs from many threads at once, more than the shards have slots: each gets its own completion and
/// every frame arrives whole on its own connection.
fn many_threads_share_the_shards(engine: &dyn Engine) {
    let dir = tempdir("threads");
    let path = dir.path().join("src");
    let data = random_bytes(11, BLOCK_BYTES - HEAD_ROOM_BYTES);
    fs::write(&path, &data).unwrap();
    let session = start(engine);
    let zerocopy = engine.capabilities().zerocopy_send;
    std::thread::scope(|s| {
        for t in 0..6u64 {
            let sub = session.submitter();
            let (path, data) = (&path, &data);
            s.spawn(move || {
                let file = File::open(path).unwrap();
                let (ours, mut peer) = pair();
                let reader = std::thread::spawn(move || {
                    let mut got = Vec::new();
                    peer.read_to_end(&mut got).unwrap();
                    got
                });
                for i in 0..4u64 {
                    let offset = (t * 4 + i) * 1000;
                    let len = data.len() as u64 - offset;
                    let c = run(&sub, |tx| send_job(tx, &ours, &file, path, offset, len, zerocopy && i % 2 == 0, LONG));
                    assert!(matches!(c.outcome, Outcome::Moved { bytes, .. } if bytes == len), "{:?}", c.outcome);
                }
                drop(ours);
                let got = reader.join().unwrap();
                let mut at = 0;
                for i in 0..4u64 {
                    let offset = ((t * 4 + i) * 1000) as usize;
                    let len = data.len() - offset;
                    assert_eq!(&got[at..at + 4], b"HEAD");
                    assert!(got[at + HEAD_BYTES..at + HEAD_BYTES + len] == data[offset..]);
                    at += HEAD_BYTES + len;
                }
                assert_eq!(at, got.len());
            });
        }
    });
}

macro_rules! on_both_engines {
    ($($case:ident),* $(,)?) => {
        mod uring {
            fn engine() -> super::UringEngine {
                super::UringEngine::probe().expect("io_uring must work on the test machine; run the fallback suite elsewhere")
            }
            $(#[test] fn $case() { super::$case(&engine()) })*
        }
        mod fallback {
            $(#[test] fn $case() { super::$case(&super::FallbackEngine::new()) })*
        }
    };
}

on_both_engines!(
    sends_head_and_payload,
    short_file_sends_what_there_is,
    receives_checks_and_writes,
    the_gate_decides_whether_a_checked_payload_is_written,
    digest_mismatch_writes_nothing,
    peer_closing_mid_payload_fails,
    stalled_peer_times_out,
    a_slow_but_moving_peer_is_not_a_stall,
    stalled_receiver_times_out_a_send,
    payload_larger_than_a_slot_is_refused,
    receives_into_a_direct_descriptor,
    cancelled_jobs_leave_the_socket_alone,
    many_threads_share_the_shards,
);
