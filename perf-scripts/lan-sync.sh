#!/usr/bin/env bash
# lan-sync.sh — no-op `sync` over the network on loopback: fastsync push and pull (fastsync://) against the rsync
# daemon both ways, on a tree of many small directories, where what counts is how a tool compares two trees across a
# connection (round trips per directory), not bandwidth. Each tool's destination is synced once (untimed, verified),
# then every round runs each tool once in rotating order; medians, ratios, client and server CPU.
# See perf-scripts/README.md.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: perf-scripts/lan-sync.sh [options]

  --rounds N           rounds (default: 9)
  --shape AxBxC        the tree: A directories of B subdirectories of C files of 0-63 bytes (default: 200x5x20:
                       21,201 entries, 1,201 directories)
  --no-build           do not run `cargo build --release`
  -h, --help           this text

Environment: FSB_DIR (work dir, default /var/tmp/fsbench), FSB_BIN (fastsync binary), FSB_RESULTS, FSB_NOTE.
Output: perf-scripts/results/lan-sync-<date>.md and .csv; logs in perf-scripts/results/tmp/lan-sync-<date>/.
EOF
}

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=perf-scripts/lib.sh
source "$SCRIPT_DIR/lib.sh"
REPO=$(cd "$SCRIPT_DIR/.." && pwd)

ROUNDS=9
SHAPE=200x5x20
DO_BUILD=1
while (($#)); do
    case $1 in
        --rounds) ROUNDS=$2; shift ;;
        --shape) SHAPE=$2; shift ;;
        --no-build) DO_BUILD=0 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
    shift
done
[[ $SHAPE =~ ^[0-9]+x[0-9]+x[0-9]+$ ]] || die "--shape must be AxBxC: $SHAPE"
for t in rsync python3; do command -v "$t" >/dev/null || die "$t is required"; done
[[ -x /usr/bin/time ]] || die "GNU time (/usr/bin/time) is required"

WORK=${FSB_DIR:-/var/tmp/fsbench}/lan-sync
RESULTS=${FSB_RESULTS:-$SCRIPT_DIR/results}
open_results lan-sync
fastsync_binary die
TOOLS=(fastsync-push fastsync-pull rsyncd-push rsyncd-pull)
PORT_FS=17878 PORT_RSYNCD=17873

# ---------------------------------------------------------------- data and servers
SRC="$WORK/src-$SHAPE"
if [[ ! -f $SRC.ok ]]; then
    log "generating $SRC"
    make_tree "$SRC" "$SHAPE" 7 0 63
    touch "$SRC.ok"
fi
TOKEN="$LOGDIR/token"
head -c 32 /dev/urandom | base64 >"$TOKEN"
chmod 600 "$TOKEN"
cat >"$LOGDIR/rsyncd.conf" <<EOF
use chroot = no
uid = root
gid = root
[w]
  path = $WORK
  read only = no
EOF
env -u FASTSYNC_TOKEN "$FASTSYNC" serve "$WORK" --listen "127.0.0.1:$PORT_FS" --token-file "$TOKEN" \
    </dev/null >"$LOGDIR/serve.log" 2>&1 &
FS_PID=$!
rsync --daemon --no-detach --address=127.0.0.1 --port="$PORT_RSYNCD" --config="$LOGDIR/rsyncd.conf" \
    --log-file=/dev/null </dev/null >"$LOGDIR/rsyncd.log" 2>&1 &
RS_PID=$!
trap 'kill "$FS_PID" "$RS_PID" 2>/dev/null || true' EXIT
sleep 1
{ kill -0 "$FS_PID" && kill -0 "$RS_PID"; } || die "a server did not start (see $LOGDIR)"

# CPU seconds a server process has used, its reaped children included (the rsync daemon forks one per connection).
server_cpu() { # pid
    awk -v hz="$(getconf CLK_TCK)" '{printf "%.3f", ($14 + $15 + $16 + $17) / hz}' "/proc/$1/stat"
}

# the command of TOOL; its destination is $WORK/dst-TOOL
declare -a CMD
tool_cmd() {
    local fs=(env -u FASTSYNC_TOKEN "$FASTSYNC" --token-file "$TOKEN" sync --delete)
    local src_rel=${SRC#"$WORK"/}
    case $1 in
        fastsync-push) CMD=("${fs[@]}" "$SRC" "fastsync://127.0.0.1:$PORT_FS/dst-$1") ;;
        fastsync-pull) CMD=("${fs[@]}" "fastsync://127.0.0.1:$PORT_FS/$src_rel" "$WORK/dst-$1") ;;
        rsyncd-push) CMD=(rsync -a --delete "$SRC/" "rsync://127.0.0.1:$PORT_RSYNCD/w/dst-$1/") ;;
        rsyncd-pull) CMD=(rsync -a --delete "rsync://127.0.0.1:$PORT_RSYNCD/w/$src_rel/" "$WORK/dst-$1/") ;;
    esac
}
server_of() { [[ $1 == fastsync-* ]] && echo "$FS_PID" || echo "$RS_PID"; }

# types, sizes, mtimes (ns) and modes of every entry, for comparing a destination with the source
manifest() { (cd "$1" && find . -printf '%P %y %s %T@ %m\n' | LC_ALL=C sort); }
manifest "$SRC" >"$LOGDIR/src.manifest"
verify() { cmp -s <(manifest "$WORK/dst-$1") "$LOGDIR/src.manifest"; }

for t in "${TOOLS[@]}"; do
    log "first sync of $t (untimed)"
    tool_cmd "$t"
    "${CMD[@]}" >"$LOGDIR/first-$t.log" 2>&1 || die "first sync of $t failed (see $LOGDIR/first-$t.log)"
    verify "$t" || die "first sync of $t: the destination differs from the source"
done

# ---------------------------------------------------------------- rounds
echo "round,position,tool,status,wall_s,cli_cpu_s,srv_cpu_s" >"$CSV"
for ((r = 1; r <= ROUNDS; r++)); do
    for ((i = 0; i < ${#TOOLS[@]}; i++)); do
        t=${TOOLS[$(((i + r - 1) % ${#TOOLS[@]}))]}
        tool_cmd "$t"
        # warm: every tool reads both trees' metadata from the caches
        find "$SRC" "$WORK/dst-$t" -printf '%s %T@\n' >/dev/null
        srv=$(server_of "$t")
        c0=$(server_cpu "$srv")
        t0=$(date +%s%N)
        rc=0
        /usr/bin/time -f '%U %S' -o "$LOGDIR/time" "${CMD[@]}" >"$LOGDIR/run.log" 2>&1 || rc=$?
        t1=$(date +%s%N)
        sleep 0.2 # the daemon reaps its child
        c1=$(server_cpu "$srv")
        status=ok
        if ((rc != 0)); then status="FAILED: exit $rc"; elif ! verify "$t"; then status="FAILED: tree differs"; fi
        wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", (b - a) / 1e9}')
        cli=$(awk '{printf "%.2f", $1 + $2}' "$LOGDIR/time")
        scpu=$(awk -v a="$c0" -v b="$c1" 'BEGIN {printf "%.2f", b - a}')
        log "r$r $(printf '%-14s' "$t") ${wall}s  cpu client ${cli}s server ${scpu}s  $status"
        echo "$r,$((i + 1)),$t,$status,$wall,$cli,$scpu" >>"$CSV"
    done
done

# ---------------------------------------------------------------- report
python3 - "$CSV" "$REPORT" "$SHAPE" "$ROUNDS" "$($FASTSYNC --version)" "$(rsync --version | head -n1)" \
    "${FSB_NOTE:-}" "$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo '?')" <<'PY'
import csv, statistics, sys
path, report, shape, rounds, fsv, rsv, note, commit = sys.argv[1:9]
rows = list(csv.DictReader(open(path)))
a, b, c = (int(x) for x in shape.split("x"))
entries, dirs = a * b * c + a * b + a + 1, a * b + a + 1
tools = ["fastsync-push", "rsyncd-push", "fastsync-pull", "rsyncd-pull"]
med = {}
out = [f"# No-op sync over loopback — {path.rsplit('/', 1)[-1][:-4]}", "",
       f"Tree: {entries:,} entries in {dirs:,} directories ({shape}: files of 0-63 bytes), unchanged since the last "
       f"sync; every tool compares both trees (size + mtime) and transfers nothing. {rounds} rounds, rotating order, "
       "warm caches; wall time of the client command; server CPU from /proc (the rsync daemon's reaped children "
       "included). Every run is verified (types, sizes, mtimes, modes of every entry).", "",
       f"- {fsv} (commit {commit}); {rsv}", "",
       "| tool | ok/runs | median wall s | min–max s | median CPU s client + server | vs the rsync daemon |",
       "|---|---:|---:|---:|---:|---:|"]
for t in tools:
    ok = [r for r in rows if r["tool"] == t and r["status"] == "ok"]
    n = sum(r["tool"] == t for r in rows)
    if not ok:
        out.append(f"| `{t}` | 0/{n} | — | — | — | — |")
        continue
    w = [float(r["wall_s"]) for r in ok]
    med[t] = statistics.median(w)
    cpu = f"{statistics.median(float(r['cli_cpu_s']) for r in ok):.2f} + {statistics.median(float(r['srv_cpu_s']) for r in ok):.2f}"
    peer = "rsyncd-" + t.split("-")[1]
    ratio = ""
    pw = [float(r["wall_s"]) for r in rows if r["tool"] == peer and r["status"] == "ok"]
    if t.startswith("fastsync") and pw:
        ratio = f"{statistics.median(pw) / med[t]:.2f}×"
    out.append(f"| `{t}` | {len(ok)}/{n} | {med[t]:.3f} | {min(w):.3f}–{max(w):.3f} | {cpu} | {ratio} |")
out += ["", "Ratio = median(rsync daemon wall) / median(fastsync wall), the same direction.", ""]
if note:
    out += [f"Note: {note}", ""]
out += [f"Raw runs: `{path.rsplit('/', 1)[-1]}`."]
open(report, "w").write("\n".join(out) + "\n")
print("\n".join(out))
PY
log "report: $REPORT"
