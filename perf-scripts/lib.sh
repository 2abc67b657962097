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

# The small-files set: SMALL_SHAPE = DIRSxSUBDIRSxFILES seeded random files of 1-64 KiB, made once (SMALL.ok).
make_small() {
    if [[ -f $SMALL.ok ]]; then log "reusing $SMALL"; return; fi
    rm -rf "$SMALL"
    log "generating $SMALL (seeded, 1-64 KiB files)"
    python3 - "$SMALL" "$SMALL_SHAPE" <<'PY'
import os, random, sys
root, shape = sys.argv[1], sys.argv[2]
a, b, c = (int(x) for x in shape.split("x"))
rng = random.Random(20240611)
for i in range(a):
    for j in range(b):
        d = os.path.join(root, f"d{i:03d}", f"s{j:02d}")
        os.makedirs(d)
        for k in range(c):
            with open(os.path.join(d, f"f{k:04d}.bin"), "wb") as f:
                f.write(rng.randbytes(rng.randint(1024, 65536)))
PY
    touch "$SMALL.ok"
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
