#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this): formatting, lints, then every test of every crate
# (unit, engine contract on both engines, CLI integration on both engines, benches in quick test mode).
# One debug build serves all tests; nothing is built twice for different profiles.
set -euo pipefail
cd "$(dirname "$0")/.."

# Tools some tests use to check results independently (getfattr/setfattr, setpriv). Installed when missing and we
# can (root with apt); tests that need a missing tool say so and skip that check.
need=()
command -v setfattr >/dev/null || need+=(attr)
command -v setpriv >/dev/null || need+=(util-linux)
command -v strace >/dev/null || need+=(strace)
if ((${#need[@]})) && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  echo "tests: installing ${need[*]}" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null) ||
    echo "tests: could not install ${need[*]}; dependent checks will be skipped" >&2
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --all-targets --locked

# The product must build off Linux too (the fallback engine is what runs there). Where the macOS standard library is
# installed (`rustup target add x86_64-apple-darwin`), type-check every crate but the io_uring one for it. `cargo
# check` links nothing; the C parts of dependencies (blake3, zstd) still run their build scripts, and a Linux C
# compiler cannot target macOS, so a no-op compiler and archiver stand in for them.
if rustup target list --installed 2>/dev/null | grep -qx x86_64-apple-darwin; then
  echo "== cargo check --target x86_64-apple-darwin"
  CC_x86_64_apple_darwin=/bin/true AR_x86_64_apple_darwin=/bin/true \
    cargo check --workspace --exclude fastsync-uring --lib --bins --benches --locked --target x86_64-apple-darwin
else
  echo "== skipped: cargo check for macOS (rustup target add x86_64-apple-darwin to run it)"
fi
