# lib.sh — what the perf scripts share: the data sets (sourced; the caller defines `log` and the variables
# SMALL, SMALL_SHAPE, REAL and REPO).

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
