#!/usr/bin/env bash
# local-copy.sh — local copy benchmark: fastsync vs cp, rsync, xcp, fcp, cpz.
#
# Copies three data sets (one big random file, a tree of small files, a real
# directory tree) with every tool into a fresh destination, in cold-cache and
# warm-cache modes, N rounds with rotating tool order; verifies every copy
# (outside the timed region) and reports medians next to fio's concurrent
# read+write limit of the same disk.  See perf-scripts/README.md.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: perf-scripts/local-copy.sh [options]

  --quick              smoke test: 1 GiB big file, 2,000 small files, 2 rounds
  --sets LIST          comma list of data sets: big,small,real     (default: all)
  --modes LIST         comma list of modes: cold,warm              (default: both)
  --tools LIST         comma list of tools (default: all available of
                       fastsync,fastsync-fallback,cp,rsync,xcp,fcp,cpz);
                       optional extras: fastsync-uring, xcp-parblock
  --rounds N           rounds per data set and mode                (default: 5)
  --fresh-fs           (root) every run writes into a filesystem made for it:
                       a new ext4 (journal as the work dir's fs has it) on a
                       loop image in the work dir (same disk, direct-I/O
                       loop), made and mounted outside the timed region,
                       removed after verification. Takes the aging of the
                       work dir's filesystem out of the comparison (see the
                       report's notes)
  --no-build           do not run `cargo build --release`
  --no-install         do not install missing peers (apt / cargo install)
  -h, --help           this text

Environment:
  FSB_DIR          work dir (data sets and copies), default /var/tmp/fsbench;
                   must be on the filesystem you want to measure
  FSB_ROUNDS       rounds (default 5; --quick: 2)
  FSB_BIG_GIB      size of the big file in GiB (default 4; --quick: 1)
  FSB_SMALL_SHAPE  DIRSxSUBDIRSxFILES of the small tree (default 20x10x100;
                   --quick: 20x10x10)
  FSB_FIO_GIB      size of fio's read and write files (default 4; --quick: 2)
  FSB_KEEP=1       keep the data sets in FSB_DIR afterwards (reused next run)
  FSB_RESULTS      results dir (default perf-scripts/results)

Output: perf-scripts/results/local-copy-<date>.md (report) and .csv (raw
per-round numbers); tool logs in perf-scripts/results/tmp/<date>/.
EOF
}

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=perf-scripts/lib.sh
source "$SCRIPT_DIR/lib.sh"
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
TOOLS_ROOT="$SCRIPT_DIR/.tools"
export PATH="$TOOLS_ROOT/bin:$PATH"

ROUNDS=${FSB_ROUNDS:-5}
BIG_GIB=${FSB_BIG_GIB:-4}
SMALL_SHAPE=${FSB_SMALL_SHAPE:-20x10x100}
FIO_GIB=${FSB_FIO_GIB:-4}
WORK=${FSB_DIR:-/var/tmp/fsbench}
RESULTS=${FSB_RESULTS:-$SCRIPT_DIR/results}
SETS=big,small,real
MODES=cold,warm
ALL_TOOLS=fastsync,fastsync-fallback,cp,rsync,xcp,fcp,cpz
TOOLS=""
DO_BUILD=1
DO_INSTALL=1
QUICK=0
FRESH_FS=0

while (($#)); do
    case $1 in
        --quick)
            QUICK=1
            ROUNDS=2
            BIG_GIB=1
            SMALL_SHAPE=20x10x10
            FIO_GIB=2
            ;;
        --sets) SETS=$2; shift ;;
        --sets=*) SETS=${1#*=} ;;
        --modes) MODES=$2; shift ;;
        --modes=*) MODES=${1#*=} ;;
        --tools) TOOLS=$2; shift ;;
        --tools=*) TOOLS=${1#*=} ;;
        --rounds) ROUNDS=$2; shift ;;
        --rounds=*) ROUNDS=${1#*=} ;;
        --fresh-fs) FRESH_FS=1 ;;
        --no-build) DO_BUILD=0 ;;
        --no-install) DO_INSTALL=0 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "rounds must be a positive integer: $ROUNDS"
[[ $BIG_GIB =~ ^[1-9][0-9]*$ ]] || die "FSB_BIG_GIB must be a positive integer: $BIG_GIB"
[[ $FIO_GIB =~ ^[1-9][0-9]*$ ]] || die "FSB_FIO_GIB must be a positive integer: $FIO_GIB"
[[ $SMALL_SHAPE =~ ^[0-9]+x[0-9]+x[0-9]+$ ]] || die "FSB_SMALL_SHAPE must be AxBxC: $SMALL_SHAPE"
for s in ${SETS//,/ }; do [[ $s == big || $s == small || $s == real ]] || die "unknown set: $s"; done
for m in ${MODES//,/ }; do [[ $m == cold || $m == warm ]] || die "unknown mode: $m"; done

open_results local-copy

IS_ROOT=0
[[ $(id -u) -eq 0 ]] && IS_ROOT=1
if ((FRESH_FS)); then
    ((IS_ROOT)) || die "--fresh-fs needs root (losetup, mkfs, mount)"
    for t in losetup mkfs.ext4 mount umount; do command -v $t >/dev/null || die "--fresh-fs needs $t"; done
fi

# ---------------------------------------------------------------- 1. build + peers
install_apt_peers() {
    local missing=()
    command -v fio >/dev/null || missing+=(fio)
    command -v rsync >/dev/null || missing+=(rsync)
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

install_cargo_peer() { # crate -> installs into $TOOLS_ROOT
    local crate=$1
    [[ -x $TOOLS_ROOT/bin/$crate ]] && return 0
    command -v "$crate" >/dev/null && return 0
    ((DO_INSTALL)) || return 1
    log "cargo install --locked $crate (this takes a few minutes on 2 cores)"
    if (cd "$SCRIPT_DIR" && cargo install --locked --root "$TOOLS_ROOT" "$crate") \
        >"$LOGDIR/install-$crate.log" 2>&1; then
        return 0
    fi
    note "peer $crate failed to build (see $LOGDIR/install-$crate.log); continuing without it"
    return 1
}

install_apt_peers
[[ -x /usr/bin/time ]] || die "GNU time (/usr/bin/time) is required"
command -v python3 >/dev/null || die "python3 is required"

FASTSYNC="$REPO/target/release/fastsync"
if ((DO_BUILD)); then
    log "cargo build --release"
    if ! (cd "$REPO" && cargo build --release) >"$LOGDIR/build.log" 2>&1; then
        note "cargo build --release failed (see $LOGDIR/build.log)"
    fi
fi

# every tool the user asked for (or all), minus the unavailable ones
[[ -n $TOOLS ]] || TOOLS=$ALL_TOOLS
declare -a TOOL_LIST=()
for t in ${TOOLS//,/ }; do
    case $t in
        fastsync | fastsync-fallback | fastsync-uring)
            if [[ -x $FASTSYNC ]]; then TOOL_LIST+=("$t"); else note "$t: $FASTSYNC not built, skipped"; fi ;;
        cp) TOOL_LIST+=(cp) ;;
        rsync) if command -v rsync >/dev/null; then TOOL_LIST+=(rsync); else note "rsync not installed, skipped"; fi ;;
        xcp | xcp-parblock) if install_cargo_peer xcp; then TOOL_LIST+=("$t"); fi ;;
        fcp) if install_cargo_peer fcp; then TOOL_LIST+=(fcp); fi ;;
        cpz) if install_cargo_peer cpz; then TOOL_LIST+=(cpz); fi ;;
        *) die "unknown tool: $t" ;;
    esac
done
((${#TOOL_LIST[@]})) || die "no tool to run"
note "xcp --driver parblock (not the default parfile) was seen on this machine to exit 0 with files over 2 GiB corrupt from byte 2^31-4096 on; it is only run as the opt-in tool xcp-parblock"

if install_cargo_peer b3sum; then HASH=(b3sum); else HASH=(sha256sum); fi
log "digest tool: ${HASH[*]}"

# ---------------------------------------------------------------- machine facts
tool_version() {
    case $1 in
        fastsync*)
            local v
            v=$("$FASTSYNC" --version 2>/dev/null | head -n1 || true)
            echo "${v:-fastsync (no --version output)}"
            ;;
        cp) cp --version | head -n1 ;;
        rsync) rsync --version | head -n1 | sed 's/  */ /g' ;;
        xcp*) xcp --version 2>/dev/null | head -n1 ;;
        fcp) echo "fcp $(fcp --version 2>&1 | head -n1)" ;;
        cpz) cpz --version 2>/dev/null | head -n1 ;;
    esac
}

mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
DATA="$WORK/data"
OUT="$WORK/out-$STAMP"
mkdir -p "$DATA" "$OUT"

FS_DEV=$(findmnt -no SOURCE -T "$WORK" 2>/dev/null || echo "?")
FS_TYPE=$(findmnt -no FSTYPE -T "$WORK" 2>/dev/null || stat -f -c %T "$WORK")
FS_OPTS=$(findmnt -no OPTIONS -T "$WORK" 2>/dev/null || echo "?")
JOURNAL=$(fs_journal "$WORK")
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
meta git "$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo ?)$(cd "$REPO" && git diff --quiet HEAD 2>/dev/null || echo '+dirty')"
for t in "${TOOL_LIST[@]}"; do meta "version_$t" "$(tool_version "$t")"; done
meta tools "${TOOL_LIST[*]}"
meta fresh_fs "$FRESH_FS"

cleanup() {
    local rc=$?
    fresh_fs_down
    rm -rf "$OUT" "$WORK"/fio-*.tmp 2>/dev/null || true
    hugepages_restore
    # manifests are large (tens of MB for the real set); logs and fio JSON stay
    rm -f "$LOGDIR"/*.manifest "$LOGDIR"/*.meta "$LOGDIR/time.tmp" 2>/dev/null || true
    if [[ ${FSB_KEEP:-0} != 1 ]]; then
        rm -rf "$DATA" 2>/dev/null || true
        rmdir "$WORK" 2>/dev/null || true
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- 2. data sets
BIG_BYTES=$((BIG_GIB * 1024 * 1024 * 1024))
BIG="$DATA/big-${BIG_GIB}g.bin"
SMALL="$DATA/small-$SMALL_SHAPE"
REAL="$DATA/real"

make_big() {
    if [[ -f $BIG.ok && $(stat -c %s "$BIG" 2>/dev/null || echo 0) -eq $BIG_BYTES ]]; then
        log "reusing $BIG"
        return
    fi
    rm -f "$BIG" "$BIG.ok"
    log "generating $BIG ($BIG_GIB GiB of AES-CTR keystream)"
    openssl enc -aes-128-ctr -pass pass:fastsync-bench -nosalt -pbkdf2 -in /dev/zero 2>/dev/null |
        dd of="$BIG" bs=4M count=$((BIG_GIB * 256)) iflag=fullblock status=none || true
    [[ $(stat -c %s "$BIG") -eq $BIG_BYTES ]] || die "big file has the wrong size"
    touch "$BIG.ok"
}

# Manifest of a tree: sorted (type, relative path, size | link target) plus a
# sorted list of content digests.  Identical manifests <=> identical trees.
manifest() { # dir
    (
        cd "$1"
        find . -mindepth 1 \( -type f -printf 'f\t%P\t%s\n' \) -o \( -type d -printf 'd\t%P\n' \) \
            -o \( -type l -printf 'l\t%P\t%l\n' \) -o -printf '?\t%P\n' | LC_ALL=C sort
        find . -type f -print0 | xargs -0 -r -n 256 -P "$(nproc)" "${HASH[@]}" | LC_ALL=C sort -k2
    )
}
# Metadata that cp -a keeps (mode, mtime in s) — reported, not a failure.
meta_manifest() { # path (file or dir)
    if [[ -d $1 ]]; then
        (cd "$1" && find . -mindepth 1 ! -type l -printf '%P\t%m\t%T@\n' | sed 's/\.[0-9]*$//' | LC_ALL=C sort)
    else
        stat -c '%a %Y' "$1"
    fi
}

declare -A SRC_PATH SRC_BYTES SRC_FILES SRC_KIND
prepare_set() { # set
    local s=$1
    case $s in
        big) make_big; SRC_PATH[big]=$BIG; SRC_KIND[big]="file" ;;
        small) make_small; SRC_PATH[small]=$SMALL; SRC_KIND[small]=tree ;;
        real) make_real; SRC_PATH[real]=$REAL; SRC_KIND[real]=tree ;;
    esac
    local src=${SRC_PATH[$s]}
    log "digesting source of set $s"
    if [[ ${SRC_KIND[$s]} == file ]]; then
        "${HASH[@]}" <"$src" | cut -d' ' -f1 >"$LOGDIR/src-$s.manifest"
        SRC_BYTES[$s]=$(stat -c %s "$src")
        SRC_FILES[$s]=1
    else
        manifest "$src" >"$LOGDIR/src-$s.manifest"
        SRC_BYTES[$s]=$(awk -F'\t' '$1=="f" {s+=$3} END {printf "%d", s}' "$LOGDIR/src-$s.manifest")
        SRC_FILES[$s]=$(awk -F'\t' '$1=="f" {n++} END {print n+0}' "$LOGDIR/src-$s.manifest")
    fi
    meta_manifest "$src" >"$LOGDIR/src-$s.meta"
    meta "set_${s}_bytes" "${SRC_BYTES[$s]}"
    meta "set_${s}_files" "${SRC_FILES[$s]}"
    meta "set_${s}_dirs" "$(find "$src" -type d | wc -l)"
    local desc
    case $s in
        big) desc="one ${BIG_GIB} GiB file of random data" ;;
        small) desc="tree $SMALL_SHAPE (dirs x subdirs x files) of 1-64 KiB random files" ;;
        real) desc="Rust toolchain ($(cd "$REPO" && rustc --version)) copied from its sysroot" ;;
    esac
    meta "set_${s}_desc" "$desc"
}

# ---------------------------------------------------------------- 4. fio limit
FIO_RUNS=0
run_fio() { # tag
    local tag=$1 rfile wfile="$WORK/fio-write.tmp"
    command -v fio >/dev/null || { note "fio not installed: no disk limit measured"; return 0; }
    local fio_bytes=$((FIO_GIB * 1024 * 1024 * 1024))
    if [[ -f $BIG && $(stat -c %s "$BIG") -ge $fio_bytes ]]; then
        rfile=$BIG
    else
        rfile="$WORK/fio-read.tmp"
        if [[ ! -f $rfile || $(stat -c %s "$rfile") -ne $fio_bytes ]]; then
            log "laying out fio read file ($FIO_GIB GiB)"
            fio --name=layout --filename="$rfile" --rw=write --bs=1M --size="${FIO_GIB}G" \
                --direct=1 --ioengine=io_uring --iodepth=32 --output=/dev/null
        fi
    fi
    # Two jobs of 32 x 1 MiB buffers: 2 x 17 huge pages (lib.sh), reserved once.
    [[ -n ${FIO_MEM:-} ]] || hugepages_for_fio 36
    # Registered huge-page buffers and batched submission, as fastsync's shards use them (see bench.sh).
    local common=(--bs=1M --size="${FIO_GIB}G" --direct=1 --ioengine=io_uring --iodepth=32 --fixedbufs=1
        --mem="$FIO_MEM" --iodepth_batch_submit=32 --iodepth_batch_complete_min=1 --iodepth_batch_complete_max=32)
    local kind
    # rw: one read job and one new-file write job at once; exitall stops both
    #     when the first finishes, so both rates are measured under the
    #     concurrency a copy sees.  r, w: each alone, for the serial bound.
    for kind in rw r w; do
        rm -f "$wfile"
        sync
        sleep 1
        if ((IS_ROOT)); then echo 3 >/proc/sys/vm/drop_caches; fi
        local jobs=()
        [[ $kind == w ]] || jobs+=(--name=read --filename="$rfile" --rw=read "${common[@]}")
        [[ $kind == r ]] || jobs+=(--name=write --filename="$wfile" --rw=write "${common[@]}")
        log "fio ($tag, $kind): sequential $(case $kind in rw) echo "read + write at once" ;; r) echo read ;; w) echo write ;; esac), ${FIO_GIB} GiB, 1 MiB, O_DIRECT, io_uring QD32, fixedbufs, mem=$FIO_MEM"
        if fio --output-format=json --output="$LOGDIR/fio-$tag-$kind.json" --exitall "${jobs[@]}" \
            >"$LOGDIR/fio-$tag-$kind.log" 2>&1; then
            FIO_RUNS=$((FIO_RUNS + 1))
        else
            note "fio run $tag-$kind failed (see $LOGDIR/fio-$tag-$kind.log)"
        fi
    done
    rm -f "$wfile"
    sync
    drop_page_cache
}

# ---------------------------------------------------------------- 3. the runs
# Fill CMD with the command that copies $2 to $3 with tool $1 ($4: file|tree).
declare -a CMD
tool_cmd() {
    local tool=$1 src=$2 dst=$3 kind=$4
    case $tool in
        fastsync) CMD=("$FASTSYNC" copy --json "$src" "$dst") ;;
        fastsync-fallback) CMD=("$FASTSYNC" copy --json --engine fallback "$src" "$dst") ;;
        fastsync-uring) CMD=("$FASTSYNC" copy --json --engine uring "$src" "$dst") ;;
        cp) CMD=(cp -a "$src" "$dst") ;;
        rsync) if [[ $kind == tree ]]; then CMD=(rsync -a "$src/" "$dst/"); else CMD=(rsync -a "$src" "$dst"); fi ;;
        xcp) if [[ $kind == tree ]]; then CMD=(xcp --no-progress -r "$src" "$dst"); else CMD=(xcp --no-progress "$src" "$dst"); fi ;;
        xcp-parblock)
            if [[ $kind == tree ]]; then CMD=(xcp --no-progress --driver parblock -r "$src" "$dst")
            else CMD=(xcp --no-progress --driver parblock "$src" "$dst"); fi ;;
        fcp) CMD=(fcp "$src" "$dst") ;;
        cpz) CMD=(cpz "$src" "$dst") ;;
    esac
}

drop_page_cache() {
    if ((IS_ROOT)); then echo 1 >/proc/sys/vm/drop_caches; fi
}

preread() { # src kind
    if [[ $2 == file ]]; then
        cat "$1" >/dev/null
    else
        find "$1" -type f -print0 | xargs -0 -r -n 512 cat >/dev/null
    fi
}

verify() { # set dst -> 0 ok; sets VERIFY_MSG, META_OK
    local s=$1 dst=$2
    VERIFY_MSG="" META_OK=""
    if [[ ${SRC_KIND[$s]} == file ]]; then
        [[ -f $dst ]] || { VERIFY_MSG="no output file"; return 1; }
        [[ $(stat -c %s "$dst") -eq ${SRC_BYTES[$s]} ]] || { VERIFY_MSG="size $(stat -c %s "$dst") != ${SRC_BYTES[$s]}"; return 1; }
        [[ $("${HASH[@]}" <"$dst" | cut -d' ' -f1) == "$(cat "$LOGDIR/src-$s.manifest")" ]] ||
            { VERIFY_MSG="content digest differs"; return 1; }
    else
        [[ -d $dst ]] || { VERIFY_MSG="no output directory"; return 1; }
        local m="$LOGDIR/last-dst.manifest"
        manifest "$dst" >"$m"
        if ! cmp -s "$m" "$LOGDIR/src-$s.manifest"; then
            VERIFY_MSG="tree differs: $(diff "$LOGDIR/src-$s.manifest" "$m" | grep -c '^[<>]') manifest lines ($(diff "$LOGDIR/src-$s.manifest" "$m" | grep -m1 '^[<>]' | cut -c1-120))"
            return 1
        fi
    fi
    if cmp -s <(meta_manifest "$dst") "$LOGDIR/src-$s.meta"; then META_OK=yes; else META_OK=no; fi
    return 0
}

echo "stamp,set,mode,round,position,tool,status,wall_s,user_s,sys_s,cpu_s,maxrss_kib,bytes,files,meta_preserved,note" >"$CSV"

run_one() { # set mode round position tool
    local s=$1 mode=$2 r=$3 pos=$4 tool=$5
    local src=${SRC_PATH[$s]} kind=${SRC_KIND[$s]} rdir="$OUT/$s-$mode-r$r"
    if ((FRESH_FS)); then
        rdir="$WORK/fresh-mnt"
        fresh_fs_up "$rdir" "${SRC_BYTES[$s]}" "$JOURNAL"
        rdir="$rdir/$s-$mode-r$r"
    fi
    local dst tf="$LOGDIR/time.tmp" lg="$LOGDIR/$s-$mode-r$r-$tool.log"
    mkdir -p "$rdir"
    if [[ $kind == file ]]; then
        mkdir -p "$rdir/$tool"
        dst="$rdir/$tool/$(basename "$src")"
    else
        dst="$rdir/$tool"
    fi
    tool_cmd "$tool" "$src" "$dst" "$kind"
    sync
    if [[ $mode == cold ]]; then
        echo 3 >/proc/sys/vm/drop_caches
    else
        preread "$src" "$kind"
    fi
    printf '%s\n' "${CMD[*]}" >"$lg"
    local t0 t1 rc=0
    t0=$(date +%s%N)
    # The timed region: the copy, then sync (so buffered writers pay for their writeback).
    # shellcheck disable=SC2016 # expanded by the inner bash
    /usr/bin/time -f '%e %U %S %M' -o "$tf" \
        bash -c '"$@"; rc=$?; sync; exit $rc' fsb-timed "${CMD[@]}" >>"$lg" 2>&1 || rc=$?
    t1=$(date +%s%N)
    local wall user sys rss
    wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", (b-a)/1e9}')
    read -r _ user sys rss < <(tail -n1 "$tf")
    local status=ok note=""
    if ((rc != 0)); then
        status=FAILED note="exit status $rc: $(grep -v '^Command exited' "$lg" | tail -n1 | tr ',\n' '; ' | cut -c1-160)"
    elif ! verify "$s" "$dst"; then
        status=FAILED note="verify: $VERIFY_MSG"
    fi
    local cpu
    cpu=$(awk -v u="$user" -v s="$sys" 'BEGIN {printf "%.2f", u+s}')
    if [[ $status == ok && $tool == fastsync* ]]; then
        # the engine fastsync actually used, from its --json summary
        note="engine=$(grep -o '"engine":"[a-z_]*"' "$lg" | head -n1 | cut -d'"' -f4 || true)"
    fi
    ((FRESH_FS)) && fresh_fs_down
    if [[ $status == ok ]]; then
        log "$s/$mode r$r $(printf '%-18s' "$tool") ${wall}s  cpu ${cpu}s  rss $((rss / 1024)) MiB  meta:$META_OK $note"
        echo "$STAMP,$s,$mode,$r,$pos,$tool,ok,$wall,$user,$sys,$cpu,$rss,${SRC_BYTES[$s]},${SRC_FILES[$s]},$META_OK,$note" >>"$CSV"
    else
        log "$s/$mode r$r $(printf '%-18s' "$tool") FAILED ($note)"
        echo "$STAMP,$s,$mode,$r,$pos,$tool,FAILED,,,,,,${SRC_BYTES[$s]},${SRC_FILES[$s]},,\"${note//\"/\'}\"" >>"$CSV"
    fi
}

for s in ${SETS//,/ }; do prepare_set "$s"; done
run_fio before

NT=${#TOOL_LIST[@]}
for s in ${SETS//,/ }; do
    for mode in ${MODES//,/ }; do
        if [[ $mode == cold ]] && ((!IS_ROOT)); then
            note "cold mode needs root (drop_caches): skipped"
            continue
        fi
        for ((r = 1; r <= ROUNDS; r++)); do
            # rotate the order each round so no tool always runs first/last
            for ((i = 0; i < NT; i++)); do
                run_one "$s" "$mode" "$r" "$((i + 1))" "${TOOL_LIST[$(((i + r - 1) % NT))]}"
            done
            # delete this round's copies outside any timed region; new names next round
            rm -rf "$OUT/$s-$mode-r$r"
            sync
            sleep 1 # the fs is mounted with discard: let the trims of the deleted copies drain
            # ext4 without a journal skips "recently deleted" inodes when it allocates
            # new ones (ialloc.c recently_deleted), looking each one up in the cached
            # inode-table blocks: with those blocks cached, the next round's creates
            # cost 3-4x the sys CPU (measured: cp -a of the real set 6 s -> 24 s).
            # Dropping the page cache (which holds those blocks) avoids it; the warm
            # mode pre-reads its source again before each run anyway.
            drop_page_cache
        done
    done
done

run_fio after

# ---------------------------------------------------------------- 5. report
python3 - "$CSV" "$META" "$NOTES" "$LOGDIR" "$REPORT" <<'PY'
import csv, json, os, statistics, sys
csv_path, meta_path, notes_path, logdir, report = sys.argv[1:6]
meta = {}
for line in open(meta_path):
    k, _, v = line.rstrip("\n").partition("=")
    meta[k] = v
notes = [l.rstrip("\n") for l in open(notes_path) if l.strip()]
rows = list(csv.DictReader(open(csv_path)))
med = statistics.median

def fio_bw(tag, kind):
    p = os.path.join(logdir, f"fio-{tag}-{kind}.json")
    if not os.path.exists(p):
        return None
    try:
        txt = open(p).read()
        j = json.loads(txt[txt.index("{"):])
        return {job["jobname"]: job[job["jobname"]]["bw_bytes"] / 1e9 for job in j["jobs"]}
    except Exception as e:  # noqa: BLE001
        notes.append(f"could not parse fio-{tag}-{kind}.json: {e}")
        return None

fio = []  # (tag, conc read, conc write, solo read, solo write)
for tag in ("before", "after"):
    rw, r1, w1 = fio_bw(tag, "rw"), fio_bw(tag, "r"), fio_bw(tag, "w")
    if rw and "read" in rw and "write" in rw:
        fio.append((tag, rw["read"], rw["write"], (r1 or {}).get("read"), (w1 or {}).get("write")))
fio_read = statistics.mean(f[1] for f in fio) if fio else None
fio_write = statistics.mean(f[2] for f in fio) if fio else None
fio_limit = min(fio_read, fio_write) if fio else None

def fmt(x, p=2):
    return "—" if x is None else f"{x:.{p}f}"

def serial(r, w):
    return None if not r or not w else 1 / (1 / r + 1 / w)

out = []
w = out.append
w(f"# Local copy benchmark — {meta.get('stamp')}")
w("")
w("## Machine")
w("")
w(f"- CPU: {meta.get('nproc')} × {meta.get('cpu')}")
w(f"- RAM: {meta.get('ram')}; kernel {meta.get('kernel')}")
w(f"- Work dir: `{meta.get('workdir')}`: {meta.get('fs')}")
w(f"- fastsync commit: {meta.get('git')}; rounds: {meta.get('rounds')}{' (--quick)' if meta.get('quick') == '1' else ''}; verification digest: {meta.get('digest')}")
w("- Tools:")
for t in meta.get("tools", "").split():
    w(f"  - `{t}`: {meta.get('version_' + t, '?')}")
w("")
w("## Disk limit (fio)")
w("")
if fio:
    w("fio on the work dir's disk, 1 MiB blocks, direct=1, ioengine=io_uring, iodepth=32, before and after the copies. "
      "**Concurrent**: one run with two jobs, a sequential read of an existing file and a sequential write of a new file "
      "(preallocated by fio's default `fallocate=native`), stopped when the first job ends (`--exitall`) so both rates are "
      "measured while the other runs. **Alone**: the same read, then the same write, each by itself. Decimal GB/s.")
    w("")
    w("| run | concurrent read | concurrent write | concurrent sum | **cp-style limit** min(r,w) | read alone | write alone | serial bound 1/(1/r+1/w) |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|")
    for tag, r_, w_, r1, w1 in fio:
        w(f"| {tag} | {r_:.2f} | {w_:.2f} | {r_ + w_:.2f} | {min(r_, w_):.2f} | {fmt(r1)} | {fmt(w1)} | {fmt(serial(r1, w1))} |")
    r1s = [f[3] for f in fio if f[3]]; w1s = [f[4] for f in fio if f[4]]
    r1m = statistics.mean(r1s) if r1s else None; w1m = statistics.mean(w1s) if w1s else None
    w(f"| **mean** | {fio_read:.2f} | {fio_write:.2f} | {fio_read + fio_write:.2f} | **{fio_limit:.2f}** | {fmt(r1m)} | {fmt(w1m)} | {fmt(serial(r1m, w1m))} |")
    w("")
    w("A copy through the page cache can beat the concurrent limit when its file fits in the dirty-page budget "
      "(it reads first and writes back later, each near its solo rate); the serial bound is the ceiling for that pattern.")
else:
    w("fio did not run.")
w("")
w("## Results")
w("")
w("Each cell is the median over the rounds that verified; every run copies into a fresh, new-named destination. "
  "**cold**: `sync; echo 3 > /proc/sys/vm/drop_caches` before each run. **warm**: source pre-read into the page cache before each run. "
  "In both modes the timed region is the copy command *followed by `sync`*, so buffered writes are paid for. "
  "Tool order rotates each round. CPU = user + sys (of the tool and the final sync); RSS = peak resident set of the largest process. "
  "Speedup = median(peer wall) / median(fastsync wall): above 1 means fastsync is faster.")
w("")

sets = []
for r in rows:
    if (r["set"], r["mode"]) not in sets:
        sets.append((r["set"], r["mode"]))
for s, mode in sets:
    sub = [r for r in rows if r["set"] == s and r["mode"] == mode]
    nbytes = int(sub[0]["bytes"]); nfiles = int(sub[0]["files"])
    w(f"### {s} — {mode}")
    w("")
    w(f"{meta.get('set_' + s + '_desc', s)}: {nbytes / 2**20:,.0f} MiB in {nfiles:,} files, {int(meta.get('set_' + s + '_dirs', 0)):,} dirs.")
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
            wall = med([float(r["wall_s"]) for r in ok])
            stats[t] = dict(n=n, ok=len(ok), wall=wall, cpu=med([float(r["cpu_s"]) for r in ok]),
                            rss=med([int(r["maxrss_kib"]) for r in ok]) / 1024,
                            gbs=nbytes / wall / 1e9, fps=nfiles / wall,
                            meta="yes" if all(r["meta_preserved"] == "yes" for r in ok) else "no")
        else:
            stats[t] = dict(n=n, ok=0)
    ref = stats.get("fastsync", {}).get("wall")
    is_file = s == "big"
    hdr = ["tool", "ok/runs", "wall s", "GB/s"] + ([] if is_file else ["files/s"]) + ["CPU s", "peak RSS MiB", "fastsync speedup"]
    if is_file and fio_limit:
        hdr += ["% of fio limit", "% of fio r+w"]
    hdr += ["mode+mtime kept"]
    w("| " + " | ".join(hdr) + " |")
    w("|" + "|".join(["---"] + ["---:"] * (len(hdr) - 2) + ["---"]) + "|")
    for t in tools:
        st = stats[t]
        if not st["ok"]:
            cells = [f"`{t}`", f"0/{st['n']} **FAILED**"] + ["—"] * (len(hdr) - 2)
        else:
            sp = "1.00 (ref)" if t == "fastsync" else (fmt(st["wall"] / ref) if ref else "—")
            engines = sorted({r["note"][7:] for r in sub if r["tool"] == t and r["status"] == "ok" and r["note"].startswith("engine=")})
            name = f"`{t}` ({'/'.join(e for e in engines if e)})" if any(engines) else f"`{t}`"
            cells = [name, f"{st['ok']}/{st['n']}", fmt(st["wall"], 3), fmt(st["gbs"])]
            if not is_file:
                cells.append(f"{st['fps']:,.0f}")
            cells += [fmt(st["cpu"]), f"{st['rss']:.0f}", sp]
            if is_file and fio_limit:
                cells.append(f"{100 * st['gbs'] / fio_limit:.0f}%")
                cells.append(f"{100 * 2 * st['gbs'] / (fio_read + fio_write):.0f}%")
            cells.append(st["meta"])
        w("| " + " | ".join(cells) + " |")
    fails = [r for r in sub if r["status"] != "ok"]
    if fails:
        w("")
        for r in fails:
            w(f"- FAILED: `{r['tool']}` round {r['round']}: {r['note']}")
    w("")
if fio_limit:
    w(f"% of fio limit = copy rate (file bytes / wall) ÷ min(read, write) of the concurrent fio run ({fio_limit:.2f} GB/s): "
      "a copy reads and writes every byte, so it cannot beat the slower of the two while both run at once. "
      f"% of fio r+w = the copy's I/O (2 × file bytes / wall) ÷ fio's read + write sum ({fio_read + fio_write:.2f} GB/s).")
    w("")
w("## Notes and caveats")
w("")
w("- The machine is shared and noisy: read the medians and the ratios, compare tools only within one run, and look at the raw rounds in the CSV.")
if meta.get('fresh_fs') == '1':
    w("- `--fresh-fs`: every run wrote into a new ext4 made for it (a loop image in the work dir, so the same disk; direct-I/O loop device; "
      "journal as the work dir's filesystem has it; inode tables initialized at mkfs), made, mounted and (cold mode) dropped from the caches "
      "outside the timed region, removed after verification. Sources are read from the work dir. Without it, destinations on the long-used "
      "work dir filesystem paid for ext4's recently-deleted-inode scan in every create (`recently_deleted`, `find_inode_bit`: 50-75% of "
      "the CPU of a tree copy in profiles, growing run after run), which no copy tool controls.")
else:
    w("- Destinations are fresh directories with new names each run (ext4 without journal is slow to re-create recently deleted inodes); "
      "a round's copies are deleted after the round, outside the timed region, followed by `sync` and a page-cache drop: "
      "without the drop, the next creates pay for ext4's recently-deleted-inode check against the cached inode tables (3-4x the sys CPU).")
w("- Verification (outside the timed region): big file by content digest; trees by a sorted list of (type, relative path, size or link target) plus per-file digests. "
  "A run whose tool exits non-zero or whose output differs is reported FAILED and not timed.")
for n_ in notes:
    w(f"- {n_}")
w("")
w(f"Raw per-round numbers: `{os.path.basename(csv_path)}`.")
text = "\n".join(out) + "\n"
open(report, "w").write(text)
print(text)
PY

log "report: $REPORT"
log "raw:    $CSV"
