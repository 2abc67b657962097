#!/usr/bin/env bash
# A/B of the fastsync:// data paths on loopback: the thread paths (FASTSYNC_ZEROCOPY=sendfile, the default before
# the shards, and both = sendfile + splice) against the engine's socket shards (shards = SEND from registered
# buffers, shards-zc = SEND_ZC from them), for a push and a pull of one large file. Client and server run the same
# variant (each process reads FASTSYNC_ZEROCOPY). Variants alternate within each round; every output is compared
# with cmp outside the timed region.
#
#   perf-scripts/netshard-ab.sh [SIZE_MIB] [ROUNDS] [VARIANTS...]
#   perf-scripts/netshard-ab.sh 1024 3 sendfile shards shards-zc
#
# Wall time (ns clock) and client CPU (GNU /usr/bin/time: user + sys) per run; the server's CPU from
# /proc/PID/stat (utime + stime) before and after. Writes results/netshard-ab-DATE.{csv,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-1024}
ROUNDS=${2:-3}
shift 2 || true
VARIANTS=("$@")
[ ${#VARIANTS[@]} -gt 0 ] || VARIANTS=(sendfile shards shards-zc)
BIN=${FASTSYNC_BIN:-target/release/fastsync}
[ -x "$BIN" ] || nice -n 19 cargo build --release
WORK=${NETSHARD_DIR:-/var/tmp/netshard-ab}
rm -rf "$WORK"; mkdir -p "$WORK/src"
echo secret-token > "$WORK/token"
head -c $((SIZE_MIB << 20)) /dev/urandom > "$WORK/src/big.bin"
cat "$WORK/src/big.bin" > /dev/null
STAMP=$(date -u +%Y-%m-%d-%H%M%S)
CSV=perf-scripts/results/netshard-ab-$STAMP.csv
MD=perf-scripts/results/netshard-ab-$STAMP.md
echo "variant,direction,round,wall_s,client_cpu_s,server_cpu_s,mb_s" > "$CSV"
TICK=$(getconf CLK_TCK)
cpu_of() { awk -v t="$TICK" '{print ($14 + $15) / t}' "/proc/$1/stat"; }

declare -A PORT PID
port=27000
for v in "${VARIANTS[@]}"; do
    port=$((port + 1)); PORT[$v]=$port
    mkdir -p "$WORK/served-$v"
    FASTSYNC_ZEROCOPY=$v "$BIN" --token-file "$WORK/token" serve "$WORK/served-$v" --listen 127.0.0.1:$port \
        2> "$WORK/serve-$v.log" &
    PID[$v]=$!
done
trap 'for p in "${PID[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
sleep 1

run() { # variant direction round
    local v=$1 dir=$2 r=$3 url="fastsync://127.0.0.1:${PORT[$1]}"
    local src dst out
    if [ "$dir" = push ]; then
        rm -f "$WORK/served-$v/big.bin"; src="$WORK/src/big.bin"; dst="$url/big.bin"; out="$WORK/served-$v/big.bin"
    else
        rm -rf "$WORK/pulled"; mkdir -p "$WORK/pulled"; src="$url/big.bin"; dst="$WORK/pulled/big.bin"
        out="$WORK/pulled/big.bin"
    fi
    sync
    local s0 t0 t1 s1
    s0=$(cpu_of "${PID[$v]}")
    t0=$(date +%s%N)
    FASTSYNC_ZEROCOPY=$v /usr/bin/time -f "%U %S" -o "$WORK/time" "$BIN" --token-file "$WORK/token" copy \
        --streams 4 "$src" "$dst"
    t1=$(date +%s%N)
    s1=$(cpu_of "${PID[$v]}")
    cmp "$WORK/src/big.bin" "$out" || { echo "FAILED: $v $dir round $r: output differs" >&2; exit 1; }
    local wall cpu scpu mbs
    wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", (b - a) / 1e9}')
    cpu=$(awk '{printf "%.3f", $1 + $2}' "$WORK/time")
    scpu=$(awk -v a="$s0" -v b="$s1" 'BEGIN{printf "%.3f", b - a}')
    mbs=$(awk -v w="$wall" -v m="$SIZE_MIB" 'BEGIN{printf "%.0f", m * 1048576 / w / 1e6}')
    echo "$v,$dir,$r,$wall,$cpu,$scpu,$mbs" | tee -a "$CSV"
}

for r in $(seq 1 "$ROUNDS"); do
    # Rotate the order every round.
    n=${#VARIANTS[@]}
    for i in $(seq 0 $((n - 1))); do
        v=${VARIANTS[$(((i + r) % n))]}
        run "$v" push "$r"
        run "$v" pull "$r"
    done
done

{
    echo "# fastsync:// data paths, loopback, $SIZE_MIB MiB, $ROUNDS rounds ($(date -u))"
    echo
    echo "Commit $(git rev-parse --short HEAD), $(nproc) cores, $(uname -r). Medians; CPU s = client + server"
    echo "(the receiver's share: server on a push, client on a pull)."
    echo
    echo "| variant | direction | wall s | CPU s (client + server) | client CPU s | server CPU s | MB/s |"
    echo "|---|---|---:|---:|---:|---:|---:|"
    for v in "${VARIANTS[@]}"; do
        for dir in push pull; do
            awk -F, -v v="$v" -v d="$dir" '
                $1 == v && $2 == d { n++; w[n] = $4; c[n] = $5; s[n] = $6; t[n] = $5 + $6; m[n] = $7 }
                function med(a, n,   i, j, x) {
                    for (i = 2; i <= n; i++) { x = a[i]; for (j = i - 1; j >= 1 && a[j] > x; j--) a[j + 1] = a[j]; a[j + 1] = x }
                    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
                }
                END { if (n) printf "| `%s` | %s | %.2f | %.2f | %.2f | %.2f | %.0f |\n", v, d, med(w, n), med(t, n), med(c, n), med(s, n), med(m, n) }
            ' "$CSV"
        done
    done
    echo
    echo "Raw rounds: \`$(basename "$CSV")\`."
} > "$MD"
cat "$MD"
