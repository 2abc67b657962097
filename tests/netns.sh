#!/usr/bin/env bash
# netns.sh — fastsync:// transfers between two network namespaces joined by a veth pair, on a plain link, under a
# `tc tbf` rate limit, and with packets dropped at random by nftables (1% and 5%, both directions). After every push
# and pull the destination must be exact, checked with independent tools (find -printf listing of type, mode, owner,
# size, ns mtime, symlink target; a content digest of every file), and no `.fstmp-` temporary may remain.
#
#   tests/netns.sh [FASTSYNC_BINARY]        (or FASTSYNC_BIN=...; default: target/{release,debug}/fastsync)
#
# Needs root, `ip netns`, `tc` (tbf) and `nft`; installs iproute2/nftables quietly with apt when missing and root.
# Without them it prints why and exits 0 (skipped). Runs in well under 2 minutes; tests/netns.rs runs it from
# `cargo test`. Env: NETNS_KEEP=1 keeps the work dir; NETNS_SCENARIOS="plain tbf loss1 loss5" picks scenarios.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
T0=$(date +%s)

log() { printf '[netns %3ds] %s\n' "$(($(date +%s) - T0))" "$*" >&2; }
skip() { echo "netns: SKIPPED: $*" >&2; exit 0; }
fail() { echo "netns: FAILED: $*" >&2; exit 1; }

BIN=${1:-${FASTSYNC_BIN:-}}
if [[ -z $BIN ]]; then
  for b in "${CARGO_TARGET_DIR:-$REPO/target}"/{release,debug}/fastsync; do [[ -x $b ]] && { BIN=$b; break; }; done
fi
[[ -n $BIN && -x $BIN ]] || fail "no fastsync binary (pass its path or set FASTSYNC_BIN)"
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")

# ------------------------------------------------------------------------------------------------ prerequisites
[[ $(uname -s) == Linux ]] || skip "not Linux"
[[ $(id -u) == 0 ]] || skip "needs root (creates network namespaces, a veth pair, tc and nftables rules)"
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v tc >/dev/null || need+=(iproute2)
command -v nft >/dev/null || need+=(nftables)
if ((${#need[@]})) && command -v apt-get >/dev/null; then
  log "installing ${need[*]}"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"; } >/dev/null 2>&1 ||
    log "apt-get install ${need[*]} failed"
fi
for t in ip tc nft; do command -v "$t" >/dev/null || skip "'$t' is not installed"; done
ip netns list >/dev/null 2>&1 || skip "'ip netns' does not work here"

# unique names, so two runs (or a leftover of a killed run) never collide; interface names stay within 15 bytes
ID=$$
NS_A=fsnt-a-$ID # client
NS_B=fsnt-b-$ID # server
IF_A=fsnta$ID
IF_B=fsntb$ID
IP_A=198.18.7.1
IP_B=198.18.7.2
WORK=$(mktemp -d /tmp/fastsync-netns.XXXXXX)
SERVER_PID=""

cleanup() {
  local rc=$?
  if [[ -n $SERVER_PID ]]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  for ns in "$NS_A" "$NS_B"; do
    if ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$ns"; then
      # only processes inside our own namespaces
      for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
      ip netns del "$ns" 2>/dev/null || true
    fi
  done
  if [[ $rc != 0 || ${NETNS_KEEP:-0} == 1 ]]; then
    echo "netns: work dir kept: $WORK" >&2
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "$NS_A" 2>/dev/null || skip "cannot create a network namespace (ip netns add failed)"
ip netns add "$NS_B"
ip link add "$IF_A" netns "$NS_A" type veth peer name "$IF_B" netns "$NS_B" 2>/dev/null ||
  skip "cannot create a veth pair"
ip -n "$NS_A" link set lo up
ip -n "$NS_B" link set lo up
ip -n "$NS_A" addr add "$IP_A/30" dev "$IF_A"
ip -n "$NS_B" addr add "$IP_B/30" dev "$IF_B"
ip -n "$NS_A" link set "$IF_A" up
ip -n "$NS_B" link set "$IF_B" up
if command -v ping >/dev/null; then
  ip netns exec "$NS_A" ping -q -c 1 -W 5 "$IP_B" >/dev/null || fail "no ping across the veth pair"
fi
# probe the features now, so a kernel without them skips instead of failing half-way
ip netns exec "$NS_A" tc qdisc add dev "$IF_A" root tbf rate 50mbit burst 64kb latency 50ms 2>/dev/null ||
  skip "tc tbf is not available in this kernel"
ip netns exec "$NS_A" tc qdisc del dev "$IF_A" root
ip netns exec "$NS_A" nft add table inet fsnt 2>/dev/null || skip "nftables does not work here"
ip netns exec "$NS_A" nft add chain inet fsnt out '{ type filter hook output priority 0; policy accept; }' 2>/dev/null ||
  skip "nftables output hook not available"
ip netns exec "$NS_A" nft add rule inet fsnt out oifname "$IF_A" meta l4proto tcp numgen random mod 100 '<' 1 drop \
  2>/dev/null || skip "nftables 'numgen random' not available"
ip netns exec "$NS_A" nft delete table inet fsnt
log "namespaces $NS_A ($IP_A, client) and $NS_B ($IP_B, server) up; binary $BIN"

if command -v b3sum >/dev/null; then HASH=b3sum; else HASH=sha256sum; fi

# ------------------------------------------------------------------------------------------------ data
TOKEN="$WORK/token"
printf 'netns-test-%s-%s\n' "$ID" "$RANDOM$RANDOM" >"$TOKEN"
chmod 600 "$TOKEN"
SRC="$WORK/src"
SERVED="$WORK/served"
mkdir -p "$SERVED"

# a tree like tests' build_small_tree, with more: nested and empty dirs, an empty file, relative, absolute, dangling
# and directory symlinks, odd modes, foreign owners, a name with spaces, ns mtimes on files, links and dirs; plus one
# 64 MiB random file (several chunks and ranges over every stream) and 300 small files in one directory.
make_tree() {
  local r=$1 i
  mkdir -p "$r"/{sub/deep/er,other,emptydir/nested,"with space",many}
  head -c 64 /dev/urandom >"$r/a.txt"
  head -c 4097 /dev/urandom >"$r/b.bin"
  head -c 100000 /dev/urandom >"$r/sub/c.txt"
  head -c 1048577 /dev/urandom >"$r/sub/deep/d.bin"     # just over 1 MiB: a chunked file
  head -c 3000 /dev/urandom >"$r/sub/deep/er/e.txt"
  head -c 7 /dev/urandom >"$r/other/f"
  head -c 1234 /dev/urandom >"$r/with space/g h"
  : >"$r/sub/empty_file"
  for i in $(seq -w 1 300); do head -c $((RANDOM % 5000 + 1)) /dev/urandom >"$r/many/m$i"; done
  head -c $((64 << 20)) /dev/urandom >"$r/big.bin"
  ln -s a.txt "$r/link_to_a"
  ln -s ../../a.txt "$r/sub/deep/up_link"
  ln -s does/not/exist "$r/dangling"
  ln -s /etc/hostname "$r/absolute_link"
  ln -s sub/deep "$r/dir_link"
  chmod 600 "$r/sub/deep/d.bin"
  chmod 755 "$r/b.bin"
  chmod 640 "$r/sub/c.txt"
  chmod 4755 "$r/other/f"
  chmod 444 "$r/a.txt"
  chmod 700 "$r/sub/deep/er"
  chmod 2775 "$r/other"
  chown 1234:5678 "$r/with space/g h"
  chown 4321:4321 "$r/sub/c.txt"
  # ns mtimes: files and links first, then directories deepest first (creating entries changes a dir's mtime)
  local n=0 p
  while IFS= read -r -d '' p; do
    n=$((n + 1))
    touch -h -d "@$((1300000000 + n * 997)).$(printf '%09d' $((n * 123457 % 1000000000)))" "$p"
  done < <(find "$r" -mindepth 1 ! -type d -print0 | sort -z)
  while IFS= read -r -d '' p; do
    n=$((n + 1))
    touch -d "@$((1200000000 + n * 991)).$(printf '%09d' $((n * 7654321 % 1000000000)))" "$p"
  done < <(find "$r" -mindepth 1 -type d -print0 | sort -rz)
}

# listing of a tree: type, mode, owner (files), size (not dirs: a dir's size is the fs's business), ns mtime, path,
# link target; then the digest of every regular file
listing() {
  (
    cd "$1"
    find . -mindepth 1 \( -type d -printf '%y %m - - %T@ %p\n' \) -o \( -type f -printf '%y %m %U:%G %s %T@ %p\n' \) \
      -o -printf '%y %m - %s %T@ %p -> %l\n' | LC_ALL=C sort -k6
    find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r "$HASH"
  )
}

check_exact() { # what expected-listing-file dir
  local what=$1 want=$2 dir=$3 got="$WORK/got.listing" tmps
  [[ -d $dir ]] || fail "$what: destination $dir does not exist"
  listing "$dir" >"$got"
  if ! cmp -s "$want" "$got"; then
    diff "$want" "$got" | head -20 >&2 || true
    fail "$what: destination $dir differs from the source (listing/digests above; < source, > destination)"
  fi
  tmps=$(find "$WORK" -name '*.fstmp-*' | head -5)
  [[ -z $tmps ]] || fail "$what: temporaries left behind: $tmps"
}

make_tree "$SRC"
listing "$SRC" >"$WORK/src.listing"
log "source tree: $(grep -c '^f' "$WORK/src.listing") files, $(grep -c '^l' "$WORK/src.listing") symlinks, $(du -sh "$SRC" | cut -f1)"

# ------------------------------------------------------------------------------------------------ server
start_server() {
  local slog="$WORK/serve.log" port="" i
  : >"$slog"
  ip netns exec "$NS_B" env -u FASTSYNC_TOKEN XDG_CONFIG_HOME=/nonexistent \
    "$BIN" serve "$SERVED" --listen "$IP_B:0" --token-file "$TOKEN" </dev/null >/dev/null 2>"$slog" &
  SERVER_PID=$!
  # fastsync: serving ROOT on ADDR:PORT
  for ((i = 0; i < 300; i++)); do
    port=$(sed -n "s/.* on $IP_B:\([0-9][0-9]*\).*/\1/p" "$slog" | head -1)
    [[ -n $port ]] && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$slog" >&2; fail "fastsync serve exited"; }
    sleep 0.1
  done
  [[ -n $port ]] || { cat "$slog" >&2; fail "fastsync serve did not say where it listens"; }
  URL="fastsync://$IP_B:$port"
  log "server: $URL (pid $SERVER_PID)"
}

client() { # args... (runs in the client namespace; time-limited so a hang fails instead of blocking CI)
  local out="$WORK/client.out" rc=0 t0=$SECONDS
  ip netns exec "$NS_A" env -u FASTSYNC_TOKEN XDG_CONFIG_HOME=/nonexistent \
    timeout 120 "$BIN" --token-file "$TOKEN" "$@" >"$out" 2>&1 </dev/null || rc=$?
  if ((rc != 0)); then
    tail -20 "$out" >&2
    fail "exit $rc: fastsync --token-file TOKEN $*"
  fi
  CLIENT_SECS=$((SECONDS - t0))
  LAST_JSON=$(tail -n1 "$out")
}

start_server

# ------------------------------------------------------------------------------------------------ link settings
link_reset() {
  local ns dev
  for ns in "$NS_A" "$NS_B"; do
    dev=$IF_A; [[ $ns == "$NS_B" ]] && dev=$IF_B
    ip netns exec "$ns" tc qdisc del dev "$dev" root 2>/dev/null || true
    ip netns exec "$ns" nft delete table inet fsnt 2>/dev/null || true
  done
}
link_tbf() { # rate: both directions
  ip netns exec "$NS_A" tc qdisc add dev "$IF_A" root tbf rate "$1" burst 64kb latency 50ms
  ip netns exec "$NS_B" tc qdisc add dev "$IF_B" root tbf rate "$1" burst 64kb latency 50ms
}
# percent: dropped at random on the way out of each namespace, so data and ACKs both lose. veth hands nftables GSO
# super-packets (up to 64 KiB), so one drop can take out tens of MSS-sized segments: harsher than wire loss.
link_loss() {
  local ns dev
  for ns in "$NS_A" "$NS_B"; do
    dev=$IF_A; [[ $ns == "$NS_B" ]] && dev=$IF_B
    ip netns exec "$ns" nft add table inet fsnt
    ip netns exec "$ns" nft add chain inet fsnt out '{ type filter hook output priority 0; policy accept; }'
    ip netns exec "$ns" nft add rule inet fsnt out oifname "$dev" numgen random mod 100 '<' "$1" counter drop
  done
}
dropped() { # packets the loss rules dropped so far, both sides
  local ns total=0 n
  for ns in "$NS_A" "$NS_B"; do
    n=$(ip netns exec "$ns" nft list table inet fsnt 2>/dev/null | sed -n 's/.*counter packets \([0-9]*\).*/\1/p' | head -1)
    total=$((total + ${n:-0}))
  done
  echo "$total"
}

# ------------------------------------------------------------------------------------------------ scenarios
# Each scenario: push the source tree to a fresh path on the server, check it; pull it back to a fresh local dir,
# check that; then a `sync` of the unchanged tree must transfer nothing.
run_scenario() { # name
  local name=$1 remote dst pulled
  remote="$name/tree"
  dst="$SERVED/$remote"
  pulled="$WORK/pulled-$name"
  client copy --json --streams 4 "$SRC" "$URL/$remote"
  check_exact "$name push" "$WORK/src.listing" "$dst"
  local push_s=$CLIENT_SECS
  client copy --json --streams 4 "$URL/$remote" "$pulled"
  check_exact "$name pull" "$WORK/src.listing" "$pulled"
  local pull_s=$CLIENT_SECS
  client sync --json "$SRC" "$URL/$remote"
  [[ $LAST_JSON == *'"files":0,'* ]] || fail "$name: a sync of an unchanged tree transferred files: $LAST_JSON"
  check_exact "$name no-op sync" "$WORK/src.listing" "$dst"
  log "$name: push ${push_s}s, pull ${pull_s}s, no-op sync ok$([[ $name == loss* ]] && echo ", $(dropped) packets dropped")"
  rm -rf "$dst" "$pulled"
}

# Adaptive streams (no --streams) behind a 50 mbit bottleneck with a deep queue: the queue makes the RTT longer, but
# the bandwidth-delay product stays below what 4 streams hold, so the pool stays at 4 (a growth it tries is undone,
# as more streams move no more bytes through the bottleneck); the data arrive exact.
run_adaptive() {
  local remote=adaptive/tree dst="$SERVED/adaptive/tree" notes
  client -v copy --json "$SRC" "$URL/$remote"
  check_exact "adaptive push" "$WORK/src.listing" "$dst"
  notes=$(grep -o 'streams: [0-9]* -> [0-9]*' "$WORK/client.out" | tr '\n' ';' || true)
  [[ -z $notes || $notes == *'-> 4;' ]] || fail "adaptive: the streams should end at 4 behind the bottleneck: '$notes'"
  [[ $LAST_JSON =~ \"streams\":([0-9]+), ]] || fail "adaptive: no streams count in the summary: $LAST_JSON"
  ((BASH_REMATCH[1] <= 8)) || fail "adaptive: grew to ${BASH_REMATCH[1]} streams behind a 50 mbit bottleneck"
  log "adaptive: push ${CLIENT_SECS}s, streams changes: '${notes}', at most ${BASH_REMATCH[1]}"
  rm -rf "$dst"
}

SCENARIOS=${NETNS_SCENARIOS:-plain tbf loss1 loss5 adaptive}
for s in $SCENARIOS; do
  link_reset
  case $s in
    plain) ;;
    tbf) link_tbf 50mbit ;;
    loss1) link_loss 1 ;;
    loss5) link_loss 5 ;;
    adaptive)
      ip netns exec "$NS_A" tc qdisc add dev "$IF_A" root tbf rate 50mbit burst 64kb latency 400ms
      ip netns exec "$NS_B" tc qdisc add dev "$IF_B" root tbf rate 50mbit burst 64kb latency 400ms
      run_adaptive
      continue
      ;;
    *) fail "unknown scenario $s" ;;
  esac
  run_scenario "$s"
done
link_reset
kill -0 "$SERVER_PID" 2>/dev/null || fail "the server died during the run (see $WORK/serve.log)"
log "PASSED: $SCENARIOS"
