# lib.sh — what the perf scripts share: logging, the results files of a run, and the data sets (sourced; the data
# set makers use the caller's SMALL, SMALL_SHAPE, REAL and REPO).

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The files of one run of benchmark NAME under $RESULTS: sets STAMP, LOGDIR, CSV, REPORT, META and NOTES.
open_results() {
    STAMP=$(date +%Y-%m-%d-%H%M%S)
    mkdir -p "$RESULTS"
    LOGDIR="$RESULTS/tmp/$1-$STAMP"
    mkdir -p "$LOGDIR"
    CSV="$RESULTS/$1-$STAMP.csv"
    REPORT="$RESULTS/$1-$STAMP.md"
    META="$LOGDIR/meta.env"
    NOTES="$LOGDIR/notes.txt"
    : >"$META"
    : >"$NOTES"
}
# A line for the report's notes (also logged), and a key=value fact about the run.
note() { log "note: $*"; printf '%s\n' "$*" >>"$NOTES"; }
meta() { printf '%s=%s\n' "$1" "$2" >>"$META"; }

# The fastsync binary, in FASTSYNC (an absolute path): FSB_BIN, else the release build in the target dir, built first
# unless DO_BUILD=0. $1 says what a failed build is: `die` (the run stops) or `note` (the run goes on, and says so).
fastsync_binary() {
    if [[ -n ${FSB_BIN:-} ]]; then
        FASTSYNC=$FSB_BIN
        [[ $FASTSYNC == /* ]] || FASTSYNC="$PWD/$FASTSYNC"
        return
    fi
    local target=${CARGO_TARGET_DIR:-$REPO/target}
    [[ $target == /* ]] || target="$REPO/$target"
    FASTSYNC="$target/release/fastsync"
    if ((DO_BUILD)); then
        log "cargo build --release (target dir $target)"
        (cd "$REPO" && cargo build --release) >"$LOGDIR/build.log" 2>&1 ||
            "$1" "cargo build --release failed (see $LOGDIR/build.log)"
    fi
}

# Huge pages for fio's buffers (fio --mem=shmhuge), like fastsync's THP-backed arena: without them fio's 1 MiB
# direct I/Os leave its 4 KiB pages as up to 256 segments, and fio measures its buffers rather than the disk.
# hugepages_for_fio PAGES: reserves PAGES more (vm.nr_hugepages, root only) and sets FIO_MEM to shmhuge, else to
# malloc (with a note); hugepages_restore (call it from the EXIT trap) gives them back.
HUGEPAGES_BEFORE=
hugepages_for_fio() {
    FIO_MEM=malloc
    if [[ $(id -u) -eq 0 && -w /proc/sys/vm/nr_hugepages ]]; then
        HUGEPAGES_BEFORE=$(cat /proc/sys/vm/nr_hugepages)
        echo $((HUGEPAGES_BEFORE + $1)) >/proc/sys/vm/nr_hugepages
        (($(cat /proc/sys/vm/nr_hugepages) - HUGEPAGES_BEFORE >= $1)) && FIO_MEM=shmhuge
    fi
    [[ $FIO_MEM == shmhuge ]] || note "fio runs with malloc'd buffers (4 KiB pages): no $1 huge pages could be reserved, so fio's 1 MiB direct I/Os reach the device in more segments than fastsync's"
}
hugepages_restore() {
    [[ -z $HUGEPAGES_BEFORE ]] || echo "$HUGEPAGES_BEFORE" >/proc/sys/vm/nr_hugepages
}

# The small-files set: SMALL_SHAPE = DIRSxSUBDIRSxFILES seeded random files of 1-64 KiB, made once (SMALL.ok).
make_small() {
    if [[ -f $SMALL.ok ]]; then log "reusing $SMALL"; return; fi
    log "generating $SMALL (seeded, 1-64 KiB files)"
    make_tree "$SMALL" "$SMALL_SHAPE" 20240611 1024 65536
    touch "$SMALL.ok"
}

# A seeded tree at ROOT (made anew): SHAPE = AxBxC, A directories of B subdirectories of C files of MIN-MAX bytes.
make_tree() { # root shape seed min max
    rm -rf "$1"
    python3 - "$@" <<'PY'
import os, random, sys
root, shape, seed, lo, hi = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
a, b, c = (int(x) for x in shape.split("x"))
rng = random.Random(seed)
for i in range(a):
    for j in range(b):
        d = os.path.join(root, f"d{i:03d}", f"s{j:02d}")
        os.makedirs(d)
        for k in range(c):
            with open(os.path.join(d, f"f{k:04d}.bin"), "wb") as f:
                f.write(rng.randbytes(rng.randint(lo, hi)))
PY
}

# The real tree: a copy of the Rust toolchain's sysroot, made once (REAL.ok).
make_real() {
    if [[ -f $REAL.ok ]]; then log "reusing $REAL"; return; fi
    rm -rf "$REAL"
    local sysroot
    sysroot=$(cd "$REPO" && rustc --print sysroot)
    log "copying the Rust toolchain $sysroot -> $REAL (cp -a)"
    cp -a "$sysroot" "$REAL"
    touch "$REAL.ok"
}

# --fresh-fs: a new ext4 mounted at MOUNTPOINT for one run, on a loop image in $WORK (the same disk; direct-I/O loop
# device) big enough for BYTES of copies; JOURNAL (yes/no) as the work dir's filesystem has it. Inode tables and
# journal are written at mkfs, so no lazy-init thread writes during the timed run. Sets FRESH_DEV; fresh_fs_down
# undoes it (safe to call twice, and from a cleanup trap).
FRESH_DEV=""
FRESH_MNT=""
fresh_fs_up() { # mountpoint bytes journal
    local img="$WORK/fresh.img" opts=()
    [[ $3 == no ]] && opts=(-O ^has_journal)
    truncate -s "$((($2 * 3 / 2 + (1 << 30)) / 1048576))M" "$img"
    mkfs.ext4 -q -F "${opts[@]}" -E lazy_itable_init=0,lazy_journal_init=0 "$img"
    FRESH_DEV=$(losetup -f --show --direct-io=on "$img")
    FRESH_MNT=$1
    mkdir -p "$FRESH_MNT"
    mount "$FRESH_DEV" "$FRESH_MNT"
    rmdir "$FRESH_MNT/lost+found" # a destination must hold only the copy
}
fresh_fs_down() {
    if [[ -n $FRESH_DEV ]]; then
        umount "$FRESH_MNT" 2>/dev/null || true
        losetup -d "$FRESH_DEV" 2>/dev/null || true
        FRESH_DEV=""
    fi
    rm -f "$WORK/fresh.img" 2>/dev/null || true
}
# Whether the filesystem of directory $1 has a journal: yes, no or ? (not ext*, or dumpe2fs missing).
fs_journal() {
    local dev
    dev=$(findmnt -no SOURCE -T "$1" 2>/dev/null) || { echo "?"; return; }
    if ! dumpe2fs -h "$dev" >/dev/null 2>&1; then echo "?"
    elif dumpe2fs -h "$dev" 2>/dev/null | grep -q '^Filesystem features:.*has_journal'; then echo yes
    else echo no; fi
}
