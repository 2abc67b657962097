#!/usr/bin/env bash
# sync.sh — sync benchmark: `fastsync sync` vs `rsync -a` and `rclone sync`.
#
# Each tool gets its own destination, synced once from the source (untimed,
# fully verified), then timed, N rounds with rotating tool order, in three
# scenarios: a no-op sync, a sync after a fixed random 1% of the source files
# got a new mtime, and a no-op sync comparing checksums (warm and cold cache).
# Every run is verified outside the timed region.  See perf-scripts/README.md.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: perf-scripts/sync.sh [options]

  --quick              smoke test: 2 rounds (small set, if asked for: 20x10x10)
  --sets LIST          comma list of data sets: real,small           (default: real)
  --scenarios LIST     comma list: noop,touch,checksum                (default: all)
  --cold LIST          scenarios that also get a cold-cache column   (default: checksum;
                       "none" for none; needs root)
  --tools LIST         comma list: fastsync,rsync,rclone              (default: all available)
  --rounds N           rounds per data set, scenario and mode         (default: 5)
  --touch-pct P        percentage of source files touched per round   (default: 1)
  --no-build           do not run `cargo build --release`
  --no-install         do not install missing peers (apt: rsync rclone time)
  -h, --help           this text

Environment:
  FSB_BIN          fastsync binary to use (no build); default: `cargo build --release`
                   in the repo, binary in ${CARGO_TARGET_DIR:-target}/release/fastsync
  FSB_DIR          work dir (data sets and destinations), default /var/tmp/fsbench;
                   must be on the filesystem you want to measure
  FSB_ROUNDS       rounds (default 5; --quick: 2)
  FSB_SMALL_SHAPE  DIRSxSUBDIRSxFILES of the small tree (default 20x10x100)
  FSB_KEEP=1       keep the data sets in FSB_DIR afterwards (shared with local-copy.sh)
  FSB_RESULTS      results dir (default perf-scripts/results)
  FSB_NOTE         a line for the report's notes (e.g. which commit FSB_BIN was built from)

Output: perf-scripts/results/sync-<date>.md (report) and .csv (every run);
tool logs in perf-scripts/results/tmp/sync-<date>/.
EOF
}

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=perf-scripts/lib.sh
source "$SCRIPT_DIR/lib.sh"
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
TOOLS_ROOT="$SCRIPT_DIR/.tools"
export PATH="$TOOLS_ROOT/bin:$PATH"

ROUNDS=${FSB_ROUNDS:-5}
SMALL_SHAPE=${FSB_SMALL_SHAPE:-20x10x100}
WORK=${FSB_DIR:-/var/tmp/fsbench}
RESULTS=${FSB_RESULTS:-$SCRIPT_DIR/results}
SETS=real
SCENARIOS=noop,touch,checksum
COLD=checksum
ALL_TOOLS=fastsync,rsync,rclone
TOOLS=""
TOUCH_PCT=1
DO_BUILD=1
DO_INSTALL=1
QUICK=0

while (($#)); do
    case $1 in
        --quick)
            QUICK=1
            ROUNDS=2
            SMALL_SHAPE=20x10x10
            ;;
        --sets) SETS=$2; shift ;;
        --sets=*) SETS=${1#*=} ;;
        --scenarios) SCENARIOS=$2; shift ;;
        --scenarios=*) SCENARIOS=${1#*=} ;;
        --cold) COLD=$2; shift ;;
        --cold=*) COLD=${1#*=} ;;
        --tools) TOOLS=$2; shift ;;
        --tools=*) TOOLS=${1#*=} ;;
        --rounds) ROUNDS=$2; shift ;;
        --rounds=*) ROUNDS=${1#*=} ;;
        --touch-pct) TOUCH_PCT=$2; shift ;;
        --touch-pct=*) TOUCH_PCT=${1#*=} ;;
        --no-build) DO_BUILD=0 ;;
        --no-install) DO_INSTALL=0 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "rounds must be a positive integer: $ROUNDS"
[[ $SMALL_SHAPE =~ ^[0-9]+x[0-9]+x[0-9]+$ ]] || die "FSB_SMALL_SHAPE must be AxBxC: $SMALL_SHAPE"
[[ $TOUCH_PCT =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)$ ]] || die "--touch-pct must be a number: $TOUCH_PCT"
for s in ${SETS//,/ }; do [[ $s == real || $s == small ]] || die "unknown set: $s"; done
for c in ${SCENARIOS//,/ }; do [[ $c == noop || $c == touch || $c == checksum ]] || die "unknown scenario: $c"; done
[[ $COLD == none ]] && COLD=""
for c in ${COLD//,/ }; do [[ $c == noop || $c == touch || $c == checksum ]] || die "unknown scenario in --cold: $c"; done

open_results sync

IS_ROOT=0
[[ $(id -u) -eq 0 ]] && IS_ROOT=1

# ---------------------------------------------------------------- 1. build + peers
install_apt_peers() {
    local missing=()
    command -v rsync >/dev/null || missing+=(rsync)
    [[ ,$TOOLS, == ,, || ,$TOOLS, == *,rclone,* ]] && ! command -v rclone >/dev/null && missing+=(rclone)
    [[ -x /usr/bin/time ]] || missing+=(time)
    command -v python3 >/dev/null || missing+=(python3)
    ((${#missing[@]})) || return 0
    if ((DO_INSTALL)) && ((IS_ROOT)) && command -v apt-get >/dev/null; then
        log "apt-get install ${missing[*]}"
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } \
            >"$LOGDIR/apt.log" 2>&1; then
            note "apt-get install ${missing[*]} failed (see $LOGDIR/apt.log)"
        fi
    else
        note "missing system tools: ${missing[*]} (not installed)"
    fi
}

install_apt_peers
[[ -x /usr/bin/time ]] || die "GNU time (/usr/bin/time) is required"
command -v python3 >/dev/null || die "python3 is required"

fastsync_binary note

[[ -n $TOOLS ]] || TOOLS=$ALL_TOOLS
declare -a TOOL_LIST=()
for t in ${TOOLS//,/ }; do
    case $t in
        fastsync) if [[ -x $FASTSYNC ]]; then TOOL_LIST+=(fastsync); else note "fastsync: $FASTSYNC not built, skipped"; fi ;;
        rsync) if command -v rsync >/dev/null; then TOOL_LIST+=(rsync); else note "rsync not installed, skipped"; fi ;;
        rclone) if command -v rclone >/dev/null; then TOOL_LIST+=(rclone); else note "rclone not installed, skipped"; fi ;;
        *) die "unknown tool: $t" ;;
    esac
done
((${#TOOL_LIST[@]})) || die "no tool to run"

if command -v b3sum >/dev/null; then HASH=(b3sum); else HASH=(sha256sum); fi
log "digest tool (verification): ${HASH[*]}"

# rclone without a config file prints a notice on every run; give it an empty one.
export RCLONE_CONFIG="$LOGDIR/rclone.conf"
: >"$RCLONE_CONFIG"

# ---------------------------------------------------------------- machine facts
tool_version() {
    case $1 in
        fastsync)
            local v
            v=$("$FASTSYNC" --version 2>/dev/null | head -n1 || true)
            echo "${v:-fastsync (no --version output)}"
            ;;
        rsync) rsync --version | head -n1 | sed 's/  */ /g' ;;
        rclone) rclone version 2>/dev/null | head -n1 ;;
    esac
}

# Which hash each tool's checksum mode uses, found by a tiny probe sync with debug output.
checksum_hash() {
    local p="$LOGDIR/probe" out
    rm -rf "$p"
    mkdir -p "$p/src" "$p/dst"
    echo probe >"$p/src/f"
    cp -a "$p/src/f" "$p/dst/f"
    case $1 in
        fastsync) out="BLAKE3 (fastsync sync --checksum: digests computed in parallel on every core)" ;;
        rsync)
            out=$(rsync -a -c --delete --debug=NSTR2 "$p/src/" "$p/dst/" 2>&1 |
                sed -n 's/.*negotiated checksum: *//p' | head -n1)
            out="${out:-unknown (no 'negotiated checksum' line)} (rsync -c: one sender process hashes the source, the generator hashes the destination: one thread each)"
            ;;
        rclone)
            out=$(rclone sync --checksum -vv "$p/src" "$p/dst" 2>&1 |
                grep -oiE '\b(md5|sha1|sha256|whirlpool|crc32|xxh3|xxh128|blake3|quickxor|dropbox)\b' |
                tr '[:upper:]' '[:lower:]' | sort | uniq -c | sort -rn | awk 'NR==1 {print $2}')
            out="${out:-unknown} (rclone sync --checksum: local backend hashes source and destination files, --checkers 8 in parallel by default)"
            ;;
    esac
    rm -rf "$p"
    echo "$out"
}

mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
DATA="$WORK/data"
OUT="$WORK/sync-$STAMP"
mkdir -p "$DATA" "$OUT"

FS_DEV=$(findmnt -no SOURCE -T "$WORK" 2>/dev/null || echo "?")
FS_TYPE=$(findmnt -no FSTYPE -T "$WORK" 2>/dev/null || stat -f -c %T "$WORK")
FS_OPTS=$(findmnt -no OPTIONS -T "$WORK" 2>/dev/null || echo "?")
JOURNAL="?"
if [[ $FS_TYPE == ext* ]] && command -v dumpe2fs >/dev/null; then
    if dumpe2fs -h "$FS_DEV" 2>/dev/null | grep -q '^Filesystem features:.*has_journal'; then JOURNAL=yes; else JOURNAL=no; fi
fi
meta stamp "$STAMP"
meta host "$(hostname)"
meta nproc "$(nproc)"
meta cpu "$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
meta ram "$(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
meta kernel "$(uname -r)"
meta fs "$FS_TYPE on $FS_DEV ($FS_OPTS; journal: $JOURNAL)"
meta workdir "$WORK"
meta rounds "$ROUNDS"
meta quick "$QUICK"
meta digest "${HASH[0]}"
meta touch_pct "$TOUCH_PCT"
meta git "$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo ?)$(cd "$REPO" && git diff --quiet HEAD 2>/dev/null || echo '+dirty')"
meta fastsync_bin "$FASTSYNC"
[[ -z ${FSB_NOTE:-} ]] || note "$FSB_NOTE"
for t in "${TOOL_LIST[@]}"; do
    meta "version_$t" "$(tool_version "$t")"
    meta "hash_$t" "$(checksum_hash "$t")"
done
meta tools "${TOOL_LIST[*]}"

cleanup() {
    local rc=$?
    rm -rf "$OUT" "$LOGDIR/probe" 2>/dev/null || true
    rm -f "$LOGDIR"/*.manifest "$LOGDIR"/*.list "$LOGDIR/time.tmp" 2>/dev/null || true
    if [[ ${FSB_KEEP:-0} != 1 ]]; then
        rm -rf "$DATA" 2>/dev/null || true
        rmdir "$WORK" 2>/dev/null || true
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- 2. data sets (as local-copy.sh makes them)
SMALL="$DATA/small-$SMALL_SHAPE"
REAL="$DATA/real"

# Disk space: each tool's destination is a full copy of the set.
check_space() {
    local need=0 s bytes
    for s in ${SETS//,/ }; do
        case $s in
            real) bytes=$(du -sb "$(cd "$REPO" && rustc --print sysroot)" | cut -f1) ;;
            small)
                local a b c
                IFS=x read -r a b c <<<"$SMALL_SHAPE"
                bytes=$((a * b * c * 36 * 1024))
                ;;
        esac
        local copies=${#TOOL_LIST[@]}
        [[ $s == real && -f $REAL.ok ]] || [[ $s == small && -f $SMALL.ok ]] || copies=$((copies + 1))
        need=$((need + bytes * copies))
    done
    local avail reserve=$((5 * 1024 * 1024 * 1024))
    avail=$(df -B1 --output=avail "$WORK" | tail -n1 | tr -d ' ')
    log "disk: need ~$((need >> 20)) MiB in $WORK, $((avail >> 20)) MiB free (keeping 5 GiB free for others)"
    ((avail >= need + reserve)) || die "not enough free disk space in $WORK: need ~$((need >> 20)) MiB + 5 GiB reserve, have $((avail >> 20)) MiB"
}
check_space

# Structural manifest of a tree: sorted (type, relative path, size, mtime of
# files and links | link target).  Directory mtimes and modes are in meta_manifest.
struct_manifest() { # dir
    (
        cd "$1"
        find . -mindepth 1 \( -type f -printf 'f\t%P\t%s\t%T@\n' \) -o \( -type d -printf 'd\t%P\n' \) \
            -o \( -type l -printf 'l\t%P\t%l\t%T@\n' \) -o -printf '?\t%P\n' | LC_ALL=C sort
    )
}
# Digests of a list of relative paths (NUL-separated file) under a dir.
digest_list() { # dir listfile
    (cd "$1" && xargs -0 -r -n 256 -P "$(nproc)" "${HASH[@]}" <"$2" | LC_ALL=C sort -k2)
}
# Mode of every entry and mtime of directories: what rclone does not keep; reported, not enforced.
meta_manifest() { # dir
    (cd "$1" && find . -mindepth 1 \( -type d -printf '%P\t%m\t%T@\n' \) -o \( ! -type l -printf '%P\t%m\n' \) | LC_ALL=C sort)
}

declare -A SRC_PATH SRC_BYTES SRC_FILES SRC_DIRS
prepare_set() { # set
    local s=$1
    case $s in
        small) make_small; SRC_PATH[small]=$SMALL ;;
        real) make_real; SRC_PATH[real]=$REAL ;;
    esac
    local src=${SRC_PATH[$s]}
    log "listing and digesting the source of set $s"
    (cd "$src" && find . -type f -printf '%P\0' | LC_ALL=C sort -z) >"$LOGDIR/src-$s-all.list"
    digest_list "$src" "$LOGDIR/src-$s-all.list" >"$LOGDIR/src-$s-digest.manifest"
    SRC_BYTES[$s]=$(cd "$src" && find . -type f -printf '%s\n' | awk '{s+=$1} END {printf "%d", s}')
    SRC_FILES[$s]=$(tr -cd '\0' <"$LOGDIR/src-$s-all.list" | wc -c)
    SRC_DIRS[$s]=$(find "$src" -mindepth 1 -type d | wc -l)
    meta "set_${s}_bytes" "${SRC_BYTES[$s]}"
    meta "set_${s}_files" "${SRC_FILES[$s]}"
    meta "set_${s}_dirs" "${SRC_DIRS[$s]}"
    meta "set_${s}_symlinks" "$(find "$src" -type l | wc -l)"
    local desc
    case $s in
        small) desc="tree $SMALL_SHAPE (dirs x subdirs x files) of 1-64 KiB random files" ;;
        real) desc="Rust toolchain ($(cd "$REPO" && rustc --version)) copied from its sysroot" ;;
    esac
    meta "set_${s}_desc" "$desc"
    # The fixed random sample that the touch scenario gives new mtimes (seeded: the same files every run).
    python3 - "$LOGDIR/src-$s-all.list" "$TOUCH_PCT" >"$LOGDIR/src-$s-touch.list" <<'PY'
import random, sys
names = [n for n in open(sys.argv[1], "rb").read().split(b"\0") if n]
k = max(1, round(len(names) * float(sys.argv[2]) / 100))
sample = sorted(random.Random(20240611).sample(names, min(k, len(names))))
sys.stdout.buffer.write(b"".join(n + b"\0" for n in sample))
PY
    meta "set_${s}_touched" "$(tr -cd '\0' <"$LOGDIR/src-$s-touch.list" | wc -c)"
}

# ---------------------------------------------------------------- 3. the runs
declare -a CMD
tool_cmd() { # tool scenario src dst
    local tool=$1 sc=$2 src=$3 dst=$4
    case $tool in
        fastsync)
            CMD=("$FASTSYNC" sync --delete --json)
            [[ $sc == checksum ]] && CMD+=(-c)
            CMD+=("$src" "$dst")
            ;;
        rsync)
            CMD=(rsync -a --delete)
            [[ $sc == checksum ]] && CMD+=(-c)
            CMD+=("$src/" "$dst/")
            ;;
        rclone)
            # --create-empty-src-dirs: rclone skips empty directories otherwise (rsync and fastsync copy them)
            CMD=(rclone sync --create-empty-src-dirs)
            [[ $sc == checksum ]] && CMD+=(--checksum)
            CMD+=("$src" "$dst")
            ;;
    esac
}

# warm: metadata of source and destination stat'ed into the caches; the checksum
# scenario also reads every file of both; the touch scenario the touched source files.
warm_up() { # set scenario dst
    local s=$1 sc=$2 dst=$3 src=${SRC_PATH[$1]}
    find "$src" "$dst" -printf '%s %T@\n' >/dev/null
    case $sc in
        checksum)
            find "$src" "$dst" -type f -print0 | xargs -0 -r -n 512 cat >/dev/null ;;
        touch)
            (cd "$src" && xargs -0 -r -n 512 cat <"$LOGDIR/src-$s-touch.list" >/dev/null) ;;
    esac
}

# 0 = the destination matches the source: same entries, types, sizes, file mtimes;
# plus content digests of the touched files (touch), or of every file (full).
verify() { # set dst depth(struct|touch|full) -> VERIFY_MSG, META_OK
    local s=$1 dst=$2 depth=$3 src=${SRC_PATH[$1]} m="$LOGDIR/last-dst.manifest"
    VERIFY_MSG="" META_OK=""
    [[ -d $dst ]] || { VERIFY_MSG="no destination directory"; return 1; }
    struct_manifest "$dst" >"$m"
    if ! cmp -s "$m" "$LOGDIR/src-$s-struct.manifest"; then
        VERIFY_MSG="tree differs: $(diff "$LOGDIR/src-$s-struct.manifest" "$m" | grep -c '^[<>]') manifest lines ($(diff "$LOGDIR/src-$s-struct.manifest" "$m" | grep -m1 '^[<>]' | tr '\t' ' ' | cut -c1-120))"
        return 1
    fi
    local list ref
    case $depth in
        touch) list="$LOGDIR/src-$s-touch.list"; ref="$LOGDIR/src-$s-touch-digest.manifest" ;;
        full) list="$LOGDIR/src-$s-all.list"; ref="$LOGDIR/src-$s-digest.manifest" ;;
        *) list="" ;;
    esac
    if [[ -n $list ]] && ! cmp -s <(digest_list "$dst" "$list") "$ref"; then
        VERIFY_MSG="content digests differ ($depth)"
        return 1
    fi
    if cmp -s <(meta_manifest "$dst") "$LOGDIR/src-$s-meta.manifest"; then META_OK=yes; else META_OK=no; fi
    return 0
}

refresh_src_manifests() { # set  (after the source's mtimes changed)
    local s=$1 src=${SRC_PATH[$1]}
    struct_manifest "$src" >"$LOGDIR/src-$s-struct.manifest"
    meta_manifest "$src" >"$LOGDIR/src-$s-meta.manifest"
}

echo "stamp,set,scenario,mode,round,position,tool,status,wall_s,user_s,sys_s,cpu_s,maxrss_kib,transferred,meta_preserved,note" >"$CSV"

# One timed run: CMD, then sync (so that writes are paid for), under GNU time.
# Sets WALL T_USER T_SYS RSS RC.
timed() { # logprefix
    local lg=$1 tf="$LOGDIR/time.tmp" t0 t1
    printf '%s\n' "${CMD[*]}" >"$lg.cmd"
    RC=0
    t0=$(date +%s%N)
    # shellcheck disable=SC2016 # expanded by the inner bash
    /usr/bin/time -f '%e %U %S %M' -o "$tf" \
        bash -c '"$@"; rc=$?; sync; exit $rc' fsb-timed "${CMD[@]}" >"$lg.out" 2>"$lg.err" || RC=$?
    t1=$(date +%s%N)
    WALL=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", (b-a)/1e9}')
    read -r _ T_USER T_SYS RSS < <(tail -n1 "$tf")
}

# What a run transferred: fastsync from its --json summary (last stdout line).
fastsync_summary() { # stdout file
    python3 - "$1" <<'PY' 2>/dev/null || echo "no-json"
import json, sys
lines = [l for l in open(sys.argv[1]) if l.strip()]
j = json.loads(lines[-1])
print(f"files={j.get('files')} bytes={j.get('bytes')} unchanged={j.get('unchanged')} deleted={j.get('deleted')} "
      f"attrs={j.get('attrs_updated')} errors={j.get('errors')} engine={j.get('engine')} seconds={j.get('seconds')}")
PY
}

run_one() { # set scenario mode round position tool
    local s=$1 sc=$2 mode=$3 r=$4 pos=$5 tool=$6
    local src=${SRC_PATH[$s]} dst="$OUT/$s/$tool" lg="$LOGDIR/$s-$sc-$mode-r$r-$tool"
    tool_cmd "$tool" "$sc" "$src" "$dst"
    sync
    if [[ $mode == cold ]]; then
        echo 3 >/proc/sys/vm/drop_caches
    else
        warm_up "$s" "$sc" "$dst"
    fi
    timed "$lg"
    local status=ok note="" transferred=""
    local depth=struct
    [[ $sc == touch ]] && depth="touch"
    if ((RC != 0)); then
        status=FAILED note="exit status $RC: $(grep -v '^Command exited' "$lg.err" | tail -n1 | tr ',\n' '; ' | cut -c1-160)"
    elif ! verify "$s" "$dst" "$depth"; then
        status=FAILED note="verify: $VERIFY_MSG"
    fi
    if [[ $tool == fastsync ]]; then
        transferred=$(fastsync_summary "$lg.out")
        [[ $status == ok ]] || note="$note; $transferred"
    fi
    local cpu
    cpu=$(awk -v u="$T_USER" -v s="$T_SYS" 'BEGIN {printf "%.2f", u+s}')
    if [[ $status == ok ]]; then
        log "$s/$sc/$mode r$r $(printf '%-9s' "$tool") ${WALL}s  cpu ${cpu}s  rss $((RSS / 1024)) MiB  meta:$META_OK $transferred"
        echo "$STAMP,$s,$sc,$mode,$r,$pos,$tool,ok,$WALL,$T_USER,$T_SYS,$cpu,$RSS,$transferred,$META_OK," >>"$CSV"
    else
        log "$s/$sc/$mode r$r $(printf '%-9s' "$tool") FAILED ($note)"
        echo "$STAMP,$s,$sc,$mode,$r,$pos,$tool,FAILED,$WALL,$T_USER,$T_SYS,$cpu,$RSS,$transferred,,\"${note//\"/\'}\"" >>"$CSV"
    fi
}

for s in ${SETS//,/ }; do
    prepare_set "$s"
    refresh_src_manifests "$s"
    # The untimed initial sync: every tool fills its own destination, fully verified.
    declare -a SET_TOOLS=()
    for tool in "${TOOL_LIST[@]}"; do
        dst="$OUT/$s/$tool"
        mkdir -p "$OUT/$s"
        tool_cmd "$tool" initial "${SRC_PATH[$s]}" "$dst"
        log "$s: initial sync with $tool (untimed)"
        rc=0
        "${CMD[@]}" >"$LOGDIR/$s-initial-$tool.out" 2>"$LOGDIR/$s-initial-$tool.err" || rc=$?
        if ((rc != 0)); then
            note "$s: initial sync with $tool failed (exit $rc: $(tail -n1 "$LOGDIR/$s-initial-$tool.err" | cut -c1-160)); $tool left out of set $s"
            continue
        fi
        if ! verify "$s" "$dst" full; then
            note "$s: initial sync with $tool gave a wrong destination ($VERIFY_MSG); $tool left out of set $s"
            continue
        fi
        meta "meta_${s}_$tool" "$META_OK"
        SET_TOOLS+=("$tool")
    done
    NS=${#SET_TOOLS[@]}
    ((NS)) || { note "$s: no tool synced the set; skipped"; continue; }
    sync
    for sc in ${SCENARIOS//,/ }; do
        modes=warm
        [[ ,$COLD, == *,$sc,* ]] && modes="warm cold"
        for mode in $modes; do
            if [[ $mode == cold ]] && ((!IS_ROOT)); then
                note "cold mode needs root (drop_caches): skipped for $sc"
                continue
            fi
            for ((r = 1; r <= ROUNDS; r++)); do
                if [[ $sc == touch ]]; then
                    # new mtimes on the fixed sample (ns precision, later than any earlier round's)
                    (cd "${SRC_PATH[$s]}" && xargs -0 -r touch -m <"$LOGDIR/src-$s-touch.list")
                    refresh_src_manifests "$s"
                    if [[ ! -f $LOGDIR/src-$s-touch-digest.manifest ]]; then
                        digest_list "${SRC_PATH[$s]}" "$LOGDIR/src-$s-touch.list" >"$LOGDIR/src-$s-touch-digest.manifest"
                    fi
                fi
                for ((i = 0; i < NS; i++)); do
                    run_one "$s" "$sc" "$mode" "$r" "$((i + 1))" "${SET_TOOLS[$(((i + r - 1) % NS))]}"
                done
            done
        done
    done
    # Every destination, in full, at the end: content digests of every file.
    for tool in "${SET_TOOLS[@]}"; do
        if verify "$s" "$OUT/$s/$tool" full; then
            meta "final_${s}_$tool" "ok"
        else
            meta "final_${s}_$tool" "FAILED: $VERIFY_MSG"
            note "$s: final full verification of $tool's destination failed: $VERIFY_MSG"
        fi
    done
    rm -rf "${OUT:?}/$s"
    sync
done

# ---------------------------------------------------------------- 4. report
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

def fmt(x, p=2):
    return "—" if x is None else f"{x:.{p}f}"

SCEN = {
    "noop": ("no-op sync", "nothing changed since the last sync: every tool walks both trees and compares size + mtime"),
    "touch": ("sync after touching {pct}% of the files",
              "before each round the same fixed random {n} source files ({pct}%) get a new mtime (`touch -m`, content unchanged); "
              "then every tool syncs. fastsync and rsync compare size + mtime and copy the touched files again; rclone, seeing equal sizes "
              "and different mtimes, hashes both sides and, as the hashes match, only sets the mtime"),
    "checksum": ("checksum no-op sync", "nothing changed, but every tool reads and hashes every file on both sides"),
}
TARGET = {"noop": 3.0, "checksum": 2.0}
CMDS = {
    "noop": {"fastsync": "fastsync sync --delete SRC DST", "rsync": "rsync -a --delete SRC/ DST/", "rclone": "rclone sync --create-empty-src-dirs SRC DST"},
    "checksum": {"fastsync": "fastsync sync -c --delete SRC DST", "rsync": "rsync -a -c --delete SRC/ DST/", "rclone": "rclone sync --create-empty-src-dirs --checksum SRC DST"},
}
CMDS["touch"] = CMDS["noop"]

out = []
w = out.append
w(f"# Sync benchmark — {meta.get('stamp')}")
w("")
w("## Machine")
w("")
w(f"- CPU: {meta.get('nproc')} × {meta.get('cpu')} (`nproc` = {meta.get('nproc')})")
w(f"- RAM: {meta.get('ram')}; kernel {meta.get('kernel')}")
w(f"- Work dir: `{meta.get('workdir')}`: {meta.get('fs')}")
w(f"- fastsync binary: `{meta.get('fastsync_bin')}`")
w(f"- fastsync commit: {meta.get('git')}; rounds: {meta.get('rounds')}{' (--quick)' if meta.get('quick') == '1' else ''}; verification digest: {meta.get('digest')}")
w("- Tools and the hash each uses for its checksum mode:")
for t in meta.get("tools", "").split():
    w(f"  - `{t}`: {meta.get('version_' + t, '?')}; checksum: {meta.get('hash_' + t, '?')}")
w("")
w("## Method")
w("")
w("- Each tool has its own destination, filled once by the tool itself (untimed) and verified in full (types, sizes, mtimes, content digests). "
  "Then, per scenario, every round runs every tool once, in an order that rotates each round.")
w("- **warm** (the default): before each run the metadata of the source and of the tool's destination is read into the caches "
  "(`find SRC DST -printf '%s %T@'`); for the checksum scenario every file of both is read too, for the touch scenario the touched source files. "
  "**cold**: `sync; echo 3 > /proc/sys/vm/drop_caches` before each run.")
w("- The timed region is the tool's command *followed by `sync`*, under GNU `/usr/bin/time`: wall time (ns clock), CPU = user + sys "
  "(of the tool, its children and the `sync`), peak RSS = the largest maximum resident set of any one process (rsync runs three).")
w("- After every run (untimed) the destination is checked against the source: same entries, types, sizes and file mtimes (ns); "
  "after the touch runs also the content digests of the touched files; at the end of the set, the digests of every file. "
  "A non-zero exit or a mismatch is a FAILED run, not a time. Modes and directory mtimes are reported (\"mode+dir mtime kept\"), not enforced "
  "(rclone keeps neither).")
w("- Ratio = median(peer wall) / median(fastsync wall): above 1 means fastsync is faster.")
w("")
w("## Results")
w("")

groups = []
for r in rows:
    k = (r["set"], r["scenario"], r["mode"])
    if k not in groups:
        groups.append(k)
verdicts = []
for s, sc, mode in groups:
    sub = [r for r in rows if (r["set"], r["scenario"], r["mode"]) == (s, sc, mode)]
    pct = meta.get("touch_pct"); n_t = meta.get(f"set_{s}_touched")
    title, desc = SCEN[sc]
    w(f"### {s} — {title.format(pct=pct)} — {mode}")
    w("")
    nbytes = int(meta.get(f"set_{s}_bytes", 0)); nfiles = int(meta.get(f"set_{s}_files", 0)); ndirs = int(meta.get(f"set_{s}_dirs", 0))
    w(f"{meta.get('set_' + s + '_desc', s)}: {nbytes / 2**20:,.0f} MiB in {nfiles:,} files, {ndirs:,} dirs. "
      f"{desc.format(pct=pct, n=n_t)}.")
    w("")
    tools = []
    for r in sub:
        if r["tool"] not in tools:
            tools.append(r["tool"])
    stats = {}
    for t in tools:
        ok = [r for r in sub if r["tool"] == t and r["status"] == "ok"]
        n = len([r for r in sub if r["tool"] == t])
        if ok:
            stats[t] = dict(n=n, ok=len(ok), wall=med([float(r["wall_s"]) for r in ok]),
                            wmin=min(float(r["wall_s"]) for r in ok), wmax=max(float(r["wall_s"]) for r in ok),
                            cpu=med([float(r["cpu_s"]) for r in ok]),
                            rss=med([int(r["maxrss_kib"]) for r in ok]) / 1024,
                            rssmax=max(int(r["maxrss_kib"]) for r in ok) / 1024,
                            meta="yes" if all(r["meta_preserved"] == "yes" for r in ok) else "no")
        else:
            stats[t] = dict(n=n, ok=0)
    ref = stats.get("fastsync", {}).get("wall")
    hdr = ["tool", "command", "ok/runs", "median wall s", "min–max s", "ratio vs fastsync", "median CPU s", "peak RSS MiB (median / max)", "mode+dir mtime kept"]
    w("| " + " | ".join(hdr) + " |")
    w("|---|---|" + "|".join(["---:"] * (len(hdr) - 3)) + "|---|")
    for t in tools:
        st = stats[t]
        cmd = f"`{CMDS[sc].get(t, t)}`"
        if not st["ok"]:
            w("| " + " | ".join([f"`{t}`", cmd, f"0/{st['n']} **FAILED**"] + ["—"] * (len(hdr) - 3)) + " |")
            continue
        ratio = "1.00 (ref)" if t == "fastsync" else (fmt(st["wall"] / ref) if ref else "—")
        w("| " + " | ".join([f"`{t}`", cmd, f"{st['ok']}/{st['n']}", fmt(st["wall"], 3), f"{st['wmin']:.3f}–{st['wmax']:.3f}", ratio,
                             fmt(st["cpu"]), f"{st['rss']:.0f} / {st['rssmax']:.0f}", st["meta"]]) + " |")
    fs_rows = [r for r in sub if r["tool"] == "fastsync" and r["status"] == "ok" and r["transferred"]]
    if fs_rows:
        w("")
        w(f"fastsync's own summary (`--json`, round 1): {fs_rows[0]['transferred']}.")
    fails = [r for r in sub if r["status"] != "ok"]
    if fails:
        w("")
        for r in fails:
            w(f"- FAILED: `{r['tool']}` round {r['round']}: {r['note']}")
    if sc in TARGET and ref and stats.get("rsync", {}).get("wall"):
        ratio = stats["rsync"]["wall"] / ref
        met = ratio >= TARGET[sc]
        v = f"fastsync ≥ {TARGET[sc]:.0f}× faster than rsync — **{'met' if met else 'missed'}** (rsync / fastsync = {ratio:.2f}×)"
        verdicts.append(f"{s} / {title.format(pct=pct)} / {mode}: {v}")
        w("")
        w(f"Target: {v}.")
    w("")

if verdicts:
    w("## Targets")
    w("")
    for v in verdicts:
        w(f"- {v}")
    w("")
w("## Notes")
w("")
w("- The machine is shared and noisy: read medians and ratios, compare tools only within one run, and look at the raw runs in the CSV.")
for s in sorted({g[0] for g in groups}):
    for t in meta.get("tools", "").split():
        f = meta.get(f"final_{s}_{t}")
        if f:
            w(f"- {s}: final full verification of `{t}`'s destination (every file's digest): {f}.")
for n_ in notes:
    w(f"- {n_}")
w("")
w(f"Raw per-run numbers: `{os.path.basename(csv_path)}`; tool output in `results/tmp/sync-{meta.get('stamp')}/` (git-ignored).")
text = "\n".join(out) + "\n"
open(report, "w").write(text)
print(text)
PY

log "report: $REPORT"
log "raw:    $CSV"
