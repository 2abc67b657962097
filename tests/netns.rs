//! `tests/netns.sh` from `cargo test`: fastsync:// push, pull and no-op sync between two network namespaces joined by
//! a veth pair — plain, rate-limited with `tc tbf`, and with 1% and 5% of packets dropped by nftables — each checked
//! exact with independent tools. The script creates the namespaces itself when it runs as root and skips with a
//! message (exit 0) otherwise, or when `ip netns`, `tc` or `nft` are missing.

use std::path::Path;
use std::process::Command;

#[test]
fn transfers_are_exact_over_a_veth_pair_with_rate_limit_and_loss() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/netns.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(env!("CARGO_BIN_EXE_fastsync"))
        .env_remove("FASTSYNC_TOKEN")
        .output()
        .expect("run tests/netns.sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // visible with --nocapture, and in the failure message
    eprint!("{}{stderr}", String::from_utf8_lossy(&out.stdout));
    assert!(out.status.success(), "tests/netns.sh failed ({}):\n{stderr}", out.status);
}
