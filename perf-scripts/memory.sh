#!/usr/bin/env bash
# memory.sh — peak RSS and wall time of fastsync per memory profile
# (low-memory, default, high-memory, max-throughput) on three workloads:
# `fastsync copy` of a tree of 1,000,000 empty files, `fastsync sync` no-op of
# that tree, and `fastsync copy` of one 10 GiB file of random data.  Reports
# each profile's limit beside the peak RSS.  See perf-scripts/README.md.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: perf-scripts/memory.sh [options]

  --quick              100,000 empty files (100 dirs x 1,000) and a 1 GiB file
  --profiles LIST      comma list: low-memory,default,high-memory,max-throughput (default: all)
  --workloads LIST     comma list: tree-copy,tree-sync,big-copy     (default: all)
  --rounds N           runs per profile and workload                (default: 1)
  --no-build           do not run `cargo build --release`
  -h, --help           this text

Environment:
  FSB_BIN            fastsync binary to use (no build); default: `cargo build --release`
                     in the repo, binary in ${CARGO_TARGET_DIR:-target}/release/fastsync
  FSB_DIR            work dir, default /var/tmp/fsbench (on the filesystem to measure)
  FSB_TREE_SHAPE     DIRSxFILES of the empty-file tree (default 1000x1000; --quick: 100x1000)
  FSB_BIG_GIB        size of the big file in GiB (default 10; --quick: 1)
  FSB_RESERVE_GIB    disk space to leave free for others (default 5)
  FSB_KEEP=1         keep the data sets in FSB_DIR afterwards (reused next run)
  FSB_RESULTS        results dir (default perf-scripts/results)
  FSB_NOTE           a line for the report's notes (e.g. which commit FSB_BIN was built from)

Output: perf-scripts/results/memory-<date>.md (report) and .csv (every run);
logs in perf-scripts/results/tmp/memory-<date>/.
EOF
}

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=perf-scripts/lib.sh
source "$SCRIPT_DIR/lib.sh"
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
TOOLS_ROOT="$SCRIPT_DIR/.tools"
export PATH="$TOOLS_ROOT/bin:$PATH"

ROUNDS=1
TREE_SHAPE=${FSB_TREE_SHAPE:-1000x1000}
BIG_GIB=${FSB_BIG_GIB:-10}
RESERVE_GIB=${FSB_RESERVE_GIB:-5}
WORK=${FSB_DIR:-/var/tmp/fsbench}
RESULTS=${FSB_RESULTS:-$SCRIPT_DIR/results}
PROFILES=low-memory,default,high-memory,max-throughput
WORKLOADS=tree-copy,tree-sync,big-copy
DO_BUILD=1
QUICK=0

while (($#)); do
    case $1 in
        --quick)
            QUICK=1
            TREE_SHAPE=${FSB_TREE_SHAPE:-100x1000}
            BIG_GIB=${FSB_BIG_GIB:-1}
            ;;
        --profiles) PROFILES=$2; shift ;;
        --profiles=*) PROFILES=${1#*=} ;;
        --workloads) WORKLOADS=$2; shift ;;
        --workloads=*) WORKLOADS=${1#*=} ;;
        --rounds) ROUNDS=$2; shift ;;
        --rounds=*) ROUNDS=${1#*=} ;;
        --no-build) DO_BUILD=0 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "rounds must be a positive integer: $ROUNDS"
[[ $BIG_GIB =~ ^[1-9][0-9]*$ ]] || die "FSB_BIG_GIB must be a positive integer: $BIG_GIB"
[[ $RESERVE_GIB =~ ^[0-9]+$ ]] || die "FSB_RESERVE_GIB must be an integer: $RESERVE_GIB"
[[ $TREE_SHAPE =~ ^[1-9][0-9]*x[1-9][0-9]*$ ]] || die "FSB_TREE_SHAPE must be DIRSxFILES: $TREE_SHAPE"
for p in ${PROFILES//,/ }; do
    case $p in low-memory | default | high-memory | max-throughput) ;; *) die "unknown profile: $p" ;; esac
done
for w in ${WORKLOADS//,/ }; do
    case $w in tree-copy | tree-sync | big-copy) ;; *) die "unknown workload: $w" ;; esac
done
# a no-op sync needs the copy it syncs to
[[ ,$WORKLOADS, == *,tree-sync,* && ,$WORKLOADS, != *,tree-copy,* ]] && WORKLOADS="tree-copy,$WORKLOADS"

TREE_DIRS=${TREE_SHAPE%x*}
TREE_PER=${TREE_SHAPE#*x}
TREE_FILES=$((TREE_DIRS * TREE_PER))
BIG_BYTES=$((BIG_GIB * 1024 * 1024 * 1024))
WANT_TREE=0 WANT_BIG=0
[[ ,$WORKLOADS, == *,tree-* ]] && WANT_TREE=1
[[ ,$WORKLOADS, == *,big-copy,* ]] && WANT_BIG=1

open_results memory

IS_ROOT=0
[[ $(id -u) -eq 0 ]] && IS_ROOT=1
[[ -x /usr/bin/time ]] || die "GNU time (/usr/bin/time) is required (apt-get install time)"
command -v python3 >/dev/null || die "python3 is required"
((WANT_BIG)) && ! command -v openssl >/dev/null && die "openssl is required to generate the big file"
if command -v b3sum >/dev/null; then HASH=(b3sum); else HASH=(sha256sum); fi

# ---------------------------------------------------------------- build
fastsync_binary die
[[ -x $FASTSYNC ]] || die "no fastsync binary at $FASTSYNC"

mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
DATA="$WORK/data"
OUT="$WORK/memory-$STAMP"
TREE="$DATA/empty-$TREE_SHAPE"
BIG="$DATA/big-${BIG_GIB}g.bin"   # the same name and content as local-copy.sh's big file

# ---------------------------------------------------------------- disk space (before anything is written)
# The tree costs inodes and directory blocks (~40 KiB per 1,000 entries), twice (source + copy);
# the big file costs its size twice (source + copy).
need_bytes=0 need_inodes=0
if ((WANT_TREE)); then
    need_inodes=$((TREE_FILES + TREE_DIRS + 1))
    need_bytes=$((need_bytes + TREE_FILES * 48 + TREE_DIRS * 4096))
    [[ -f $TREE.ok ]] || { need_inodes=$((need_inodes * 2)); need_bytes=$((need_bytes * 2)); }
fi
if ((WANT_BIG)); then
    need_bytes=$((need_bytes + BIG_BYTES))
    [[ -f $BIG.ok ]] || need_bytes=$((need_bytes + BIG_BYTES))
fi
reserve=$((RESERVE_GIB * 1024 * 1024 * 1024))
avail=$(df -B1 --output=avail "$WORK" | tail -n1 | tr -d ' ')
iavail=$(df --output=iavail "$WORK" | tail -n1 | tr -d ' ')
log "disk: need ~$((need_bytes >> 20)) MiB and ~$need_inodes inodes in $WORK; free: $((avail >> 20)) MiB, $iavail inodes (keeping $RESERVE_GIB GiB free for others)"
if ((avail < need_bytes + reserve)); then
    die "not enough free disk space in $WORK: need ~$((need_bytes >> 20)) MiB + ${RESERVE_GIB} GiB reserve, have $((avail >> 20)) MiB (try --quick, a smaller FSB_BIG_GIB, or FSB_DIR elsewhere)"
fi
if [[ $iavail =~ ^[0-9]+$ ]] && ((iavail > 0 && iavail < need_inodes + 100000)); then
    die "not enough free inodes in $WORK: need ~$need_inodes, have $iavail"
fi
mkdir -p "$DATA" "$OUT"

# ---------------------------------------------------------------- machine facts
FS_DEV=$(findmnt -no SOURCE -T "$WORK" 2>/dev/null || echo "?")
FS_TYPE=$(findmnt -no FSTYPE -T "$WORK" 2>/dev/null || stat -f -c %T "$WORK")
FS_OPTS=$(findmnt -no OPTIONS -T "$WORK" 2>/dev/null || echo "?")
meta stamp "$STAMP"
meta nproc "$(nproc)"
meta cpu "$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
meta ram "$(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
meta kernel "$(uname -r)"
meta fs "$FS_TYPE on $FS_DEV ($FS_OPTS)"
meta workdir "$WORK"
meta rounds "$ROUNDS"
meta quick "$QUICK"
meta tree_shape "$TREE_SHAPE"
meta tree_files "$TREE_FILES"
meta big_gib "$BIG_GIB"
meta is_root "$IS_ROOT"
meta version "$("$FASTSYNC" --version 2>/dev/null | head -n1 || echo '?')"
meta git "$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo ?)$(cd "$REPO" && git diff --quiet HEAD 2>/dev/null || echo '+dirty')"
meta fastsync_bin "$FASTSYNC"
[[ -z ${FSB_NOTE:-} ]] || note "$FSB_NOTE"

cleanup() {
    local rc=$?
    rm -rf "$OUT" 2>/dev/null || true
    rm -f "$LOGDIR"/*.manifest "$LOGDIR/time.tmp" 2>/dev/null || true
    if [[ ${FSB_KEEP:-0} != 1 ]]; then
        rm -rf "$TREE" "$TREE.ok" "$BIG" "$BIG.ok" 2>/dev/null || true
        rmdir "$DATA" "$WORK" 2>/dev/null || true
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- data sets
make_tree() {
    if [[ -f $TREE.ok ]]; then log "reusing $TREE"; return; fi
    rm -rf "$TREE"
    log "creating $TREE: $TREE_DIRS dirs x $TREE_PER empty files"
    local t0=$SECONDS
    python3 - "$TREE" "$TREE_DIRS" "$TREE_PER" <<'PY'
import os, sys
root, dirs, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
for i in range(dirs):
    d = os.path.join(root, f"d{i:04d}")
    os.makedirs(d)
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for k in range(per):
            os.close(os.open(f"f{k:04d}", flags, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
PY
    touch "$TREE.ok"
    log "created the tree in $((SECONDS - t0)) s"
}

make_big() {
    if [[ -f $BIG.ok && $(stat -c %s "$BIG" 2>/dev/null || echo 0) -eq $BIG_BYTES ]]; then
        log "reusing $BIG"
        return
    fi
    rm -f "$BIG" "$BIG.ok"
    log "generating $BIG ($BIG_GIB GiB of AES-CTR keystream: real data, not sparse)"
    openssl enc -aes-128-ctr -pass pass:fastsync-bench -nosalt -pbkdf2 -in /dev/zero 2>/dev/null |
        dd of="$BIG" bs=4M count=$((BIG_GIB * 256)) iflag=fullblock status=none || true
    [[ $(stat -c %s "$BIG") -eq $BIG_BYTES ]] || die "big file has the wrong size"
    touch "$BIG.ok"
}

tree_manifest() { # dir
    # sizes of files only: a directory's size depends on how its entries were added
    (cd "$1" && find . -mindepth 1 \( -type f -printf 'f\t%P\t%s\n' \) -o -printf '%y\t%P\n' | LC_ALL=C sort)
}

# ext4 creates inodes slowly while recently deleted ones sit in the cached inode tables (README, caveats):
# 100,000 files took 39 s instead of 5 s right after an earlier tree was deleted.  Drop the page cache first.
sync
if ((IS_ROOT)); then echo 1 >/proc/sys/vm/drop_caches; fi
if ((WANT_TREE)); then
    make_tree
    log "listing the tree"
    tree_manifest "$TREE" >"$LOGDIR/tree-src.manifest"
    [[ $(grep -c '^f' "$LOGDIR/tree-src.manifest") -eq $TREE_FILES ]] || die "the tree does not have $TREE_FILES files"
fi
if ((WANT_BIG)); then
    make_big
    log "digesting the big file"
    "${HASH[@]}" <"$BIG" | cut -d' ' -f1 >"$LOGDIR/big-src.digest"
fi
meta digest "${HASH[0]}"

# ---------------------------------------------------------------- each profile's limit, as fastsync states it (-v)
declare -A LIMIT_MIB LIMIT_SRC
mkdir -p "$LOGDIR/probe/src"
echo probe >"$LOGDIR/probe/src/f"
for p in ${PROFILES//,/ }; do
    rm -rf "$LOGDIR/probe/dst"
    line=$("$FASTSYNC" -v --memory-profile "$p" copy "$LOGDIR/probe/src" "$LOGDIR/probe/dst" 2>&1 >/dev/null |
        grep -m1 'memory limit' || true)
    meta "config_$p" "${line#fastsync: }"
    if [[ $line =~ memory\ limit\ ([0-9]+)\ MiB ]]; then
        LIMIT_MIB[$p]=${BASH_REMATCH[1]}
        LIMIT_SRC[$p]="fastsync -v"
    else
        # the documented defaults (src/config.rs MemoryProfile::limit_bytes)
        case $p in low-memory) LIMIT_MIB[$p]=256 ;; default) LIMIT_MIB[$p]=1024 ;; high-memory) LIMIT_MIB[$p]=4096 ;; max-throughput) LIMIT_MIB[$p]=8192 ;; esac
        LIMIT_SRC[$p]="built-in table"
        note "$p: fastsync -v did not state a memory limit; using ${LIMIT_MIB[$p]} MiB from src/config.rs"
    fi
    meta "limit_$p" "${LIMIT_MIB[$p]}"
    meta "limitsrc_$p" "${LIMIT_SRC[$p]}"
    log "profile $p: limit ${LIMIT_MIB[$p]} MiB (${line#fastsync: })"
done
rm -rf "$LOGDIR/probe"

# ---------------------------------------------------------------- runs
echo "stamp,profile,limit_mib,workload,round,position,status,wall_s,user_s,sys_s,cpu_s,maxrss_kib,within_limit,summary,note" >"$CSV"

drop_caches() { # cold start for every run: also avoids ext4's slow re-creation of recently deleted inodes (README)
    sync
    if ((IS_ROOT)); then echo 3 >/proc/sys/vm/drop_caches; fi
}

fastsync_summary() { # stdout file
    python3 - "$1" <<'PY' 2>/dev/null || echo "no-json"
import json, sys
lines = [l for l in open(sys.argv[1]) if l.strip()]
j = json.loads(lines[-1])
print(f"files={j.get('files')} bytes={j.get('bytes')} unchanged={j.get('unchanged')} deleted={j.get('deleted')} "
      f"errors={j.get('errors')} engine={j.get('engine')} seconds={j.get('seconds')}")
PY
}

run_one() { # profile workload round position src dst
    local p=$1 w=$2 r=$3 pos=$4 src=$5 dst=$6 lg="$LOGDIR/$2-$1-r$3" tf="$LOGDIR/time.tmp"
    local sub=copy
    [[ $w == tree-sync ]] && sub=sync
    local cmd=("$FASTSYNC" --memory-profile "$p" "$sub" --json "$src" "$dst")
    printf '%s\n' "${cmd[*]}" >"$lg.cmd"
    drop_caches
    local t0 t1 rc=0
    t0=$(date +%s%N)
    # shellcheck disable=SC2016 # expanded by the inner bash
    /usr/bin/time -f '%e %U %S %M' -o "$tf" \
        bash -c '"$@"; rc=$?; sync; exit $rc' fsb-timed "${cmd[@]}" >"$lg.out" 2>"$lg.err" || rc=$?
    t1=$(date +%s%N)
    local wall user sys rss cpu summary status=ok note=""
    wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", (b-a)/1e9}')
    read -r _ user sys rss < <(tail -n1 "$tf")
    cpu=$(awk -v u="$user" -v s="$sys" 'BEGIN {printf "%.2f", u+s}')
    summary=$(fastsync_summary "$lg.out")
    if ((rc != 0)); then
        status=FAILED note="exit status $rc: $(tail -n1 "$lg.err" | tr ',\n' '; ' | cut -c1-160)"
    else
        case $w in
            tree-copy | tree-sync)
                if ! cmp -s <(tree_manifest "$dst") "$LOGDIR/tree-src.manifest"; then
                    status=FAILED note="verify: the copy's tree differs from the source"
                elif [[ $w == tree-sync && ! $summary =~ files=0\ .*deleted=0 ]]; then
                    status=FAILED note="the no-op sync transferred or deleted something: $summary"
                fi
                ;;
            big-copy)
                if [[ $("${HASH[@]}" <"$dst" | cut -d' ' -f1) != "$(cat "$LOGDIR/big-src.digest")" ]]; then
                    status=FAILED note="verify: content digest differs"
                fi
                ;;
        esac
    fi
    local within=no
    ((rss <= LIMIT_MIB[$p] * 1024)) && within=yes
    if [[ $status == ok ]]; then
        log "$(printf '%-15s %-9s' "$p" "$w") r$r ${wall}s  cpu ${cpu}s  peak RSS $((rss / 1024)) MiB (limit ${LIMIT_MIB[$p]} MiB: $within)  $summary"
    else
        log "$(printf '%-15s %-9s' "$p" "$w") r$r FAILED ($note) peak RSS $((rss / 1024)) MiB"
    fi
    echo "$STAMP,$p,${LIMIT_MIB[$p]},$w,$r,$pos,$status,$wall,$user,$sys,$cpu,$rss,$within,$summary,\"${note//\"/\'}\"" >>"$CSV"
}

declare -a PLIST
read -r -a PLIST <<<"${PROFILES//,/ }"
NP=${#PLIST[@]}
for ((r = 1; r <= ROUNDS; r++)); do
    for ((i = 0; i < NP; i++)); do
        p=${PLIST[$(((i + r - 1) % NP))]}
        pos=$((i + 1))
        if ((WANT_TREE)); then
            d="$OUT/tree-$p-r$r"
            run_one "$p" tree-copy "$r" "$pos" "$TREE" "$d"
            [[ ,$WORKLOADS, == *,tree-sync,* ]] && run_one "$p" tree-sync "$r" "$pos" "$TREE" "$d"
            log "deleting $d"
            rm -rf "$d"
        fi
        if ((WANT_BIG)); then
            d="$OUT/big-$p-r$r"
            mkdir -p "$d"
            run_one "$p" big-copy "$r" "$pos" "$BIG" "$d/$(basename "$BIG")"
            rm -rf "$d"
        fi
    done
done
drop_caches

# ---------------------------------------------------------------- report
python3 - "$CSV" "$META" "$NOTES" "$REPORT" <<'PY'
import csv, os, statistics, sys
csv_path, meta_path, notes_path, report = sys.argv[1:5]
meta = {}
for line in open(meta_path):
    k, _, v = line.rstrip("\n").partition("=")
    meta[k] = v
notes = [l.rstrip("\n") for l in open(notes_path) if l.strip()]
rows = list(csv.DictReader(open(csv_path)))
med = statistics.median
files = int(meta["tree_files"])
shape = meta["tree_shape"].split("x")
WL = {
    "tree-copy": f"`fastsync copy` of {files:,} empty files ({shape[0]} dirs × {shape[1]})",
    "tree-sync": f"`fastsync sync` no-op of the same {files:,} files (into the copy just made)",
    "big-copy": f"`fastsync copy` of one {meta['big_gib']} GiB file of random data",
}
out = []
w = out.append
w(f"# Memory profiles — {meta['stamp']}")
w("")
w("## Machine")
w("")
w(f"- CPU: {meta['nproc']} × {meta['cpu']} (`nproc` = {meta['nproc']})")
w(f"- RAM: {meta['ram']}; kernel {meta['kernel']}")
w(f"- Work dir: `{meta['workdir']}`: {meta['fs']}")
w(f"- fastsync binary: `{meta['fastsync_bin']}`")
w(f"- fastsync: {meta['version']}, commit {meta['git']}; runs per cell: {meta['rounds']}{' (--quick)' if meta['quick'] == '1' else ''}")
w("")
w("## Method")
w("")
w("Each run is `fastsync --memory-profile P copy|sync --json SRC DST` followed by `sync`, under GNU `/usr/bin/time`: "
  "peak RSS is its \"Maximum resident set size\", wall time is the ns clock around it. "
  + ("Caches are dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`) before every run (cold). " if meta.get("is_root") == "1" else
     "Not root: caches were NOT dropped between runs. ")
  + "Profiles run in a rotating order; every copy goes to a new directory and is deleted afterwards. "
  "Verified outside the timed region: the trees by a sorted list of (type, path, size), the big file by its content digest "
  f"({meta['digest']}); the no-op sync must report 0 files transferred and 0 deleted. "
  "The limit is the one fastsync states with `-v` for that profile; \"within limit\" = peak RSS ≤ limit.")
w("")
w("Engine sizing per profile (`fastsync -v`):")
w("")
profiles = []
for r in rows:
    if r["profile"] not in profiles:
        profiles.append(r["profile"])
order = ["low-memory", "default", "high-memory", "max-throughput"]
profiles.sort(key=lambda p: order.index(p) if p in order else 99)
for p in profiles:
    w(f"- `{p}`: {meta.get('config_' + p) or '(no -v line)'}")
w("")
w("## Results")
w("")
w("| profile | limit MiB | workload | ok/runs | wall s | CPU s | peak RSS MiB | RSS / limit | within limit | fastsync summary |")
w("|---|---:|---|---:|---:|---:|---:|---:|---|---|")
wls = [x for x in ("tree-copy", "tree-sync", "big-copy") if any(r["workload"] == x for r in rows)]
matrix = {}
for p in profiles:
    for wl in wls:
        sub = [r for r in rows if r["profile"] == p and r["workload"] == wl]
        if not sub:
            continue
        ok = [r for r in sub if r["status"] == "ok"]
        limit = int(sub[0]["limit_mib"])
        rss_all = [int(r["maxrss_kib"]) / 1024 for r in sub if r["maxrss_kib"]]
        rss = max(rss_all) if rss_all else None
        within = "—" if rss is None else ("yes" if rss <= limit else "**no**")
        matrix[(p, wl)] = (rss, within)
        if ok:
            wall = med(float(r["wall_s"]) for r in ok)
            cpu = med(float(r["cpu_s"]) for r in ok)
            w(f"| `{p}` | {limit:,} | {wl} | {len(ok)}/{len(sub)} | {wall:.2f} | {cpu:.2f} | {rss:,.0f} | {100 * rss / limit:.1f}% | {within} | {ok[0]['summary']} |")
        else:
            w(f"| `{p}` | {limit:,} | {wl} | 0/{len(sub)} **FAILED** | — | — | {'—' if rss is None else f'{rss:,.0f}'} | — | {within} | {sub[0]['note']} |")
w("")
w("Peak RSS is the largest over the runs of a cell; wall and CPU are medians. Workloads:")
w("")
for wl in wls:
    w(f"- **{wl}**: {WL[wl]}")
w("")
w("Peak RSS MiB, profile × workload:")
w("")
w("| profile | limit MiB | " + " | ".join(wls) + " |")
w("|---|---:|" + "---:|" * len(wls))
for p in profiles:
    lim = int(meta.get("limit_" + p, 0))
    cells = []
    for wl in wls:
        rss, within = matrix.get((p, wl), (None, "—"))
        cells.append("—" if rss is None else f"{rss:,.0f} ({'within' if within == 'yes' else 'OVER'})")
    w(f"| `{p}` | {lim:,} | " + " | ".join(cells) + " |")
fails = [r for r in rows if r["status"] != "ok"]
if fails:
    w("")
    for r in fails:
        w(f"- FAILED: `{r['profile']}` {r['workload']} round {r['round']}: {r['note']}")
w("")
w("## Notes")
w("")
for n_ in notes:
    w(f"- {n_}")
w(f"- Raw per-run numbers: `{os.path.basename(csv_path)}`; logs in `results/tmp/memory-{meta['stamp']}/` (git-ignored).")
text = "\n".join(out) + "\n"
open(report, "w").write(text)
print(text)
PY

log "report: $REPORT"
log "raw:    $CSV"
