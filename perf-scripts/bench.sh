#!/usr/bin/env bash
# bench.sh — `fastsync bench` vs fio: the same workloads, with the same parameters, on the same files, alternating.
#
# I/O workloads (O_DIRECT): sequential read and write at 1 MiB x qd32 and random read at 4 KiB x qd32, fio's io_uring
# engine (fixedbufs, registerfiles) against `fastsync bench --engine uring`; random read 4 KiB with one I/O at a time,
# fio's psync engine against `fastsync bench --engine fallback`. Metadata: fio's filecreate / filestat / filedelete
# engines (one file at a time per job) against the phases of `fastsync bench --files N --engine fallback`.
# Medians of N rounds, tool order alternating. See perf-scripts/README.md.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: perf-scripts/bench.sh [options] [DIR]

  DIR                  directory on the disk to measure (default /var/tmp/fsbench-bench; not tmpfs).
                       Both tools use DIR/fastsync-bench/io.N (laid out once by fastsync, untimed);
                       fio's metadata files go to DIR/fio-meta/.
  --quick              smoke test: 256 MiB per thread, 3 s per run, 10,000 files, 2 rounds (~2 min)
  --workloads LIST     comma list (default: seqread,seqwrite,randread,randread-psync,meta):
                         seqread        rw=read      bs=1M qd32 direct  fio io_uring  vs fastsync --engine uring
                         seqwrite       rw=write     bs=1M qd32 direct  fio io_uring  vs fastsync --engine uring
                         randread       rw=randread  bs=4k qd32 direct  fio io_uring  vs fastsync --engine uring
                         randread-psync rw=randread  bs=4k qd1  direct  fio psync     vs fastsync --engine fallback
                         seqread-psync  rw=read      bs=1M qd1  direct  fio psync     vs fastsync --engine fallback
                         meta           create/stat/open/delete of N empty files, one at a time per thread:
                                        fio filecreate/filestat/filecreate/filedelete vs fastsync --files N
                                        --engine fallback
                         meta-uring     the same fio numbers vs fastsync --files N --engine uring (qd32 op chains
                                        per thread: NOT the same workload, shown for information)
  --rounds N           rounds (default 5; --quick: 2); tool order alternates every round and workload
  --threads N          fio numjobs = fastsync --threads (default: nproc)
  --size SIZE          file per thread, fio size= (default 1G; --quick 256M)
  --time SECONDS       runtime of each I/O run (default 10; --quick 3)
  --files N            metadata: files in all, spread over the threads (default 50000; --quick 10000)
  --fio-mem MEM        fio's I/O buffers: shmhuge (huge pages, the default when root can reserve them, like
                       fastsync's THP-backed arena) or malloc (fio's own default: 4 KiB pages, which reach the
                       device as up to 256 segments per MiB of direct I/O)
  --no-build           do not run `cargo build --release`
  -h, --help           this text

Environment: FSB_BIN (fastsync binary, no build), FSB_RESULTS (default perf-scripts/results),
FSB_KEEP=1 (keep DIR's files; the next run reuses them), FSB_NOTE (a line for the report).
Output: perf-scripts/results/bench-<date>.md and .csv; raw JSON in results/tmp/bench-<date>/.
EOF
}

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=perf-scripts/lib.sh
source "$SCRIPT_DIR/lib.sh"
REPO=$(cd "$SCRIPT_DIR/.." && pwd)

ROUNDS=${FSB_ROUNDS:-5}
RESULTS=${FSB_RESULTS:-$SCRIPT_DIR/results}
WORKLOADS=seqread,seqwrite,randread,randread-psync,meta
THREADS=$(nproc)
SIZE=1G
TIME_S=10
FILES=50000
DO_BUILD=1
FIO_MEM=auto
QUICK=0
WORK=/var/tmp/fsbench-bench

while (($#)); do
    case $1 in
        --quick)
            QUICK=1
            ROUNDS=2
            SIZE=256M
            TIME_S=3
            FILES=10000
            ;;
        --workloads) WORKLOADS=$2; shift ;;
        --workloads=*) WORKLOADS=${1#*=} ;;
        --rounds) ROUNDS=$2; shift ;;
        --rounds=*) ROUNDS=${1#*=} ;;
        --threads) THREADS=$2; shift ;;
        --threads=*) THREADS=${1#*=} ;;
        --size) SIZE=$2; shift ;;
        --size=*) SIZE=${1#*=} ;;
        --time) TIME_S=$2; shift ;;
        --time=*) TIME_S=${1#*=} ;;
        --files) FILES=$2; shift ;;
        --files=*) FILES=${1#*=} ;;
        --fio-mem) FIO_MEM=$2; shift ;;
        --fio-mem=*) FIO_MEM=${1#*=} ;;
        --no-build) DO_BUILD=0 ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
        *) WORK=$1 ;;
    esac
    shift
done

[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "--rounds must be a positive integer: $ROUNDS"
[[ $THREADS =~ ^[1-9][0-9]*$ ]] || die "--threads must be a positive integer: $THREADS"
[[ $TIME_S =~ ^[1-9][0-9]*$ ]] || die "--time must be whole seconds: $TIME_S"
[[ $FILES =~ ^[1-9][0-9]*$ ]] || die "--files must be a positive integer: $FILES"
[[ $SIZE =~ ^[1-9][0-9]*[KMG]$ ]] || die "--size must look like 256M or 1G: $SIZE"
[[ $FIO_MEM =~ ^(auto|shmhuge|malloc)$ ]] || die "--fio-mem must be shmhuge or malloc: $FIO_MEM"
for w in ${WORKLOADS//,/ }; do
    case $w in seqread | seqwrite | randread | randread-psync | seqread-psync | meta | meta-uring) ;;
        *) die "unknown workload: $w" ;;
    esac
done
# Every thread gets the same number of files (fio: nrfiles per job).
FILES_PER_THREAD=$(((FILES + THREADS - 1) / THREADS))
FILES=$((FILES_PER_THREAD * THREADS))

open_results bench
command -v fio >/dev/null || die "fio is required (apt-get install fio)"
[[ -x /usr/bin/time ]] || die "GNU time (/usr/bin/time) is required"
command -v python3 >/dev/null || die "python3 is required"
IS_ROOT=0
[[ $(id -u) -eq 0 ]] && IS_ROOT=1

fastsync_binary die
[[ -x $FASTSYNC ]] || die "no fastsync binary at $FASTSYNC"

mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
FS_TYPE=$(findmnt -no FSTYPE -T "$WORK" 2>/dev/null || stat -f -c %T "$WORK")
[[ $FS_TYPE != tmpfs ]] || die "$WORK is on tmpfs: choose a directory on a real disk"
FS_DEV=$(findmnt -no SOURCE -T "$WORK" 2>/dev/null || echo "?")
FS_OPTS=$(findmnt -no OPTIONS -T "$WORK" 2>/dev/null || echo "?")
BLK=$(basename "$(readlink -f "$FS_DEV" 2>/dev/null || echo "$FS_DEV")")
SCHED=$(cat "/sys/block/$BLK/queue/scheduler" 2>/dev/null || echo "?")

meta stamp "$STAMP"
meta host "$(hostname)"
meta nproc "$(nproc)"
meta cpu "$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
meta ram "$(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
meta kernel "$(uname -r)"
meta fs "$FS_TYPE on $FS_DEV ($FS_OPTS); scheduler $SCHED"
meta workdir "$WORK"
meta rounds "$ROUNDS"
meta quick "$QUICK"
meta threads "$THREADS"
meta size "$SIZE"
meta time_s "$TIME_S"
meta files "$FILES"
meta workloads "$WORKLOADS"
meta fio "$(fio --version)"
meta fastsync "$("$FASTSYNC" --version 2>/dev/null | head -n1 || echo ?)"
meta git "$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo ?)$(cd "$REPO" && git diff --quiet HEAD 2>/dev/null || echo '+dirty')"
meta fastsync_bin "$FASTSYNC"
meta load_start "$(cut -d' ' -f1-3 /proc/loadavg)"
[[ -z ${FSB_NOTE:-} ]] || note "$FSB_NOTE"
((IS_ROOT)) || note "not root: the caches are not dropped before the metadata runs"

FSB_FILES="$WORK/fastsync-bench"
FIO_META="$WORK/fio-meta"
# fastsync's metadata runs get their own parent, made afresh for each run as fio's is: ext4 places new directories
# (and so their files' inodes) by the parent, and on a journal-less ext4 creating inodes next to ones deleted in the
# last seconds to minutes is much slower (recently_deleted(): perf shows ~45% of create time there), so reusing
# fastsync-bench/meta.N while fio got a new parent would compare block groups, not tools.
FSB_META="$WORK/fastsync-meta"
# A directory this script made (marked), made afresh, and removed: nothing else in DIR is touched.
fresh_dir() {
    own_rm "$1"
    [[ ! -e $1 ]] || die "$1 exists and was not made by bench.sh; move it away or choose another DIR"
    mkdir -p "$1"
    : >"$1/.bench-sh"
}
own_rm() { [[ ! -e $1/.bench-sh ]] || rm -rf "$1"; }
cleanup() {
    local rc=$?
    hugepages_restore
    if [[ ${FSB_KEEP:-0} != 1 ]]; then
        # fastsync's own files (marked by it) and fio's metadata directory; nothing else in DIR.
        [[ ! -e $FSB_FILES/.fastsync-bench ]] || rm -rf "$FSB_FILES"
        own_rm "$FIO_META"
        own_rm "$FSB_META"
        rmdir "$WORK" 2>/dev/null || true
    fi
    exit "$rc"
}
trap cleanup EXIT

# ---------------------------------------------------------------- fio's buffer memory
# fastsync's buffer arena asks for transparent huge pages (MADV_HUGEPAGE), so a 1 MiB direct I/O from it is one
# segment; fio's default buffers (malloc, 4 KiB pages) make it up to 256, and a virtio disk pays per segment
# (measured here: 1.4 vs 2.4 GB/s for sequential 1 MiB reads). Like for like, fio gets huge pages too (mem=shmhuge),
# reserved for this run and given back at exit.
if [[ $FIO_MEM != malloc ]]; then
    # Per thread: iodepth x bs of the largest workload (32 x 1 MiB = 16 huge pages) plus one for alignment.
    want=$FIO_MEM
    hugepages_for_fio $((THREADS * 17 + 2))
    [[ $want == auto || $FIO_MEM == "$want" ]] || die "--fio-mem shmhuge: no huge pages could be reserved (root only; --fio-mem malloc runs without)"
fi
meta fio_mem "$FIO_MEM"

# ---------------------------------------------------------------- layout (untimed)
size_bytes() { numfmt --from=iec "$1"; }
need=$(($(size_bytes "$SIZE") * THREADS))
free=$(($(stat -f -c '%a * %S' "$WORK")))
have=0
for ((i = 0; i < THREADS; i++)); do
    f="$FSB_FILES/io.$i"
    [[ -f $f ]] && have=$((have + $(stat -c %s "$f")))
done
((need - have < free - (2 << 30))) || die "$WORK: $((free >> 20)) MiB free, the files need $(((need - have) >> 20)) MiB more (and 2 GiB spare)"
log "laying out $THREADS x $SIZE in $FSB_FILES (fastsync bench --keep, untimed; kept files are reused)"
"$FASTSYNC" bench --engine uring --rw read --bs 1M --iodepth 32 --threads "$THREADS" --size "$SIZE" --time 1s \
    --direct --keep --json "$WORK" >"$LOGDIR/layout.json" 2>"$LOGDIR/layout.err" ||
    die "layout failed: $(cat "$LOGDIR/layout.err")"

# ---------------------------------------------------------------- one run
CSV_HEAD="workload,round,order,tool,phase,ok,ops,iops,mb_s,p50_us,p99_us,cpu_s,proc_cpu_s,wall_s,seconds,load1,dev_reqs,dev_avg_kib,dev_us,dev_qd"
echo "$CSV_HEAD" >"$CSV"

# Workload parameters: rw bs iodepth fio-engine fastsync-engine.
params() {
    case $1 in
        seqread) echo "read 1M 32 io_uring uring" ;;
        seqwrite) echo "write 1M 32 io_uring uring" ;;
        randread) echo "randread 4k 32 io_uring uring" ;;
        randread-psync) echo "randread 4k 1 psync fallback" ;;
        seqread-psync) echo "read 1M 1 psync fallback" ;;
    esac
}

drop_caches() {
    sync
    ((IS_ROOT)) && echo 3 >/proc/sys/vm/drop_caches
    return 0
}

# The block device's counters (/sys/block/DEV/stat), before and after a run: requests and their mean size seen by
# the device (the whole device: other processes' I/O counts too).
dev_stat() { cat "/sys/block/$BLK/stat" 2>/dev/null || echo; }
DEV0=""
DEV1=""

# Append CSV rows from a tool's JSON. Args: workload round order tool json-file time-file [phase-name-for-fio].
rows() {
    DEV0=$DEV0 DEV1=$DEV1 python3 - "$@" <<'PY' >>"$CSV"
import json, os, sys
wl, rnd, order, tool, jf, tf = sys.argv[1:7]
fio_phase = sys.argv[7] if len(sys.argv) > 7 else ""
load1 = open("/proc/loadavg").read().split()[0]
reqs = avg_kib = dev_us = dev_qd = ""
try:
    a = [int(x) for x in os.environ["DEV0"].split()]
    b = [int(x) for x in os.environ["DEV1"].split()]
    n = (b[0] - a[0]) + (b[4] - a[4])
    sectors = (b[2] - a[2]) + (b[6] - a[6])
    ticks = (b[3] - a[3]) + (b[7] - a[7])  # ms spent by the requests, summed
    reqs, avg_kib = n, (f"{sectors / 2 / n:.1f}" if n else "0")
    dev_us = f"{ticks * 1000 / n:.0f}" if n else "0"
    dev_qd_ms = b[10] - a[10]  # weighted ms in queue: / wall = mean requests in the device
except Exception:
    dev_qd_ms = None
wall = proc = ""
try:
    e, u, s = open(tf).read().split()[-3:]
    wall, proc = e, f"{float(u) + float(s):.3f}"
    if dev_qd_ms is not None and float(e) > 0:
        dev_qd = f"{dev_qd_ms / 1000 / float(e):.1f}"
except Exception:
    pass
def row(phase, ok, ops="", iops="", mbs="", p50="", p99="", cpu="", secs=""):
    print(",".join(str(x) for x in (wl, rnd, order, tool, phase, ok, ops, iops, mbs, p50, p99, cpu, proc, wall, secs, load1,
                                    reqs, avg_kib, dev_us, dev_qd)))
try:
    j = json.load(open(jf))
except Exception:
    row(fio_phase or "?", "FAILED")
    sys.exit(0)
if tool == "fio":
    job = j["jobs"][0]
    # group_reporting: usr_cpu/sys_cpu are % of job_runtime, which sums every job's run time (ms).
    cpu = (job["usr_cpu"] + job["sys_cpu"]) / 100 * job["job_runtime"] / 1000
    for d in ("read", "write"):
        r = job[d]
        if r["total_ios"] == 0:
            continue
        # I/O engines: lat (submission to completion, lat_percentiles=1); file engines record clat only.
        pct = (r["lat_ns"].get("percentile") or r["clat_ns"].get("percentile") or {})
        p = lambda q: pct.get(q, 0) / 1000
        ok = "ok" if job["error"] == 0 else "FAILED"
        secs = r["runtime"] / 1000
        row(fio_phase or d, ok, r["total_ios"], f"{r['iops']:.1f}", f"{r['bw_bytes'] / 1e6:.2f}",
            f"{p('50.000000'):.1f}", f"{p('99.000000'):.1f}", f"{cpu:.3f}", f"{secs:.3f}")
else:
    for ph in j["phases"]:
        if ph["name"] == "fsync":
            continue
        name = {"read": "open"}.get(ph["name"], ph["name"]) if j["workload"] == "metadata" else ph["name"]
        cpu = ph["cpu_user_seconds"] + ph["cpu_system_seconds"]
        lat = ph["latency_us"]
        row(name, "ok", ph["ops"], f"{ph['iops']:.1f}", f"{ph['mb_per_s']:.2f}", f"{lat['p50']:.1f}",
            f"{lat['p99']:.1f}", f"{cpu:.3f}", f"{ph['seconds']:.3f}")
PY
}

TIMEFMT='%e %U %S'

run_io() { # workload round order tool
    local wl=$1 r=$2 o=$3 tool=$4 rw bs qd fe se out
    read -r rw bs qd fe se < <(params "$wl")
    out="$LOGDIR/$wl.r$r.$tool"
    if [[ $tool == fio ]]; then
        local extra=(--mem="$FIO_MEM")
        # Batched like fastsync's shards, which reap every completion there is and submit all freed slots in one
        # io_uring_enter: adjacent sequential I/Os submitted together can merge into one device request.
        [[ $fe == io_uring ]] && extra+=(--fixedbufs=1 --registerfiles=1 --iodepth_batch_submit="$qd"
            --iodepth_batch_complete_min=1 --iodepth_batch_complete_max="$qd")
        [[ $rw == rand* ]] && extra+=(--norandommap)
        DEV0=$(dev_stat)
        # shellcheck disable=SC2016 # $jobnum is fio's, not the shell's
        /usr/bin/time -o "$out.time" -f "$TIMEFMT" fio --name="$wl" --directory="$WORK" \
            --filename_format='fastsync-bench/io.$jobnum' --ioengine="$fe" "${extra[@]}" --direct=1 --rw="$rw" \
            --bs="$bs" --iodepth="$qd" --numjobs="$THREADS" --size="$SIZE" --time_based --runtime="$TIME_S" \
            --group_reporting --lat_percentiles=1 --output-format=json >"$out.json" 2>"$out.err" || true
        DEV1=$(dev_stat)
    else
        DEV0=$(dev_stat)
        /usr/bin/time -o "$out.time" -f "$TIMEFMT" "$FASTSYNC" bench --engine "$se" --rw "$rw" --bs "$bs" \
            --iodepth "$qd" --threads "$THREADS" --size "$SIZE" --time "${TIME_S}s" --direct --keep --json \
            "$WORK" >"$out.json" 2>"$out.err" || true
        DEV1=$(dev_stat)
    fi
    rows "$wl" "$r" "$o" "$tool" "$out.json" "$out.time"
}

run_meta() { # workload round order tool
    local wl=$1 r=$2 o=$3 tool=$4 out
    out="$LOGDIR/$wl.r$r.$tool"
    drop_caches
    if [[ $tool == fio ]]; then
        fresh_dir "$FIO_META"
        for ((i = 0; i < THREADS; i++)); do mkdir "$FIO_META/meta.$i"; done
        # filecreate: open(O_CREAT|O_RDWR) + close per file (only the open is in its latency); run again on the
        # existing files it is open + close (fastsync's read phase with --file-size 0). filestat: lstat;
        # filedelete: unlink. filesize=0 is refused by fio: 4k with bs=4k gives one (fake) I/O per file, and no
        # data is written (with create_on_open=1 for stat and delete, see below). One file open at a time per job,
        # like fastsync's fallback. file_service_type=sequential: fio's default (roundrobin) looks for the next file
        # to open among all nrfiles, so its time per file grows with nrfiles (4,000 files/s at 10,000 per job here,
        # 90% of it fio's own CPU); sequential takes the files in order, as fastsync does.
        local phase engine extra
        for phase in create stat open delete; do
            extra=()
            case $phase in
                create | open) engine=filecreate ;;
                # create_on_open=1: without it fio "lays out" the empty files first (extends each to filesize
                # with data, outside the measured time), and the unlinks then free data blocks.
                stat) engine=filestat; extra=(--stat_type=lstat --create_on_open=1) ;;
                delete) engine=filedelete; extra=(--create_on_open=1) ;;
            esac
            DEV0=$(dev_stat)
            # shellcheck disable=SC2016 # $jobnum and $filenum are fio's
            (cd "$FIO_META" && /usr/bin/time -o "$out.$phase.time" -f "$TIMEFMT" fio --name="$phase" \
                --directory=. --filename_format='meta.$jobnum/f$filenum' --ioengine="$engine" "${extra[@]}" \
                --nrfiles="$FILES_PER_THREAD" --openfiles=1 --file_service_type=sequential --filesize=4k --bs=4k \
                --numjobs="$THREADS" \
                --group_reporting --output-format=json >"$out.$phase.json" 2>"$out.$phase.err") || true
            DEV1=$(dev_stat)
            rows "$wl" "$r" "$o" fio "$out.$phase.json" "$out.$phase.time" "$phase"
        done
        own_rm "$FIO_META"
    else
        local se=fallback
        [[ $wl == meta-uring ]] && se=uring
        fresh_dir "$FSB_META"
        DEV0=$(dev_stat)
        /usr/bin/time -o "$out.time" -f "$TIMEFMT" "$FASTSYNC" bench --engine "$se" --files "$FILES" \
            --threads "$THREADS" --json "$FSB_META" >"$out.json" 2>"$out.err" || true
        DEV1=$(dev_stat)
        own_rm "$FSB_META"
        rows "$wl" "$r" "$o" fastsync "$out.json" "$out.time"
    fi
}

run_one() {
    case $1 in
        meta | meta-uring) run_meta "$@" ;;
        *) run_io "$@" ;;
    esac
}

# ---------------------------------------------------------------- rounds
log "rounds: $ROUNDS; workloads: $WORKLOADS; $THREADS threads, $SIZE per thread, ${TIME_S} s per I/O run, $FILES files"
log "load now: $(cut -d' ' -f1-3 /proc/loadavg)"
read -r -a WL <<<"${WORKLOADS//,/ }"
for ((r = 1; r <= ROUNDS; r++)); do
    for ((k = 0; k < ${#WL[@]}; k++)); do
        wl=${WL[k]}
        if (((r + k) % 2)); then order=(fio fastsync); else order=(fastsync fio); fi
        for ((o = 0; o < 2; o++)); do
            log "round $r/$ROUNDS: $wl: ${order[o]}"
            run_one "$wl" "$r" "$((o + 1))" "${order[o]}"
        done
    done
done
meta load_end "$(cut -d' ' -f1-3 /proc/loadavg)"

# ---------------------------------------------------------------- report
python3 - "$CSV" "$META" "$NOTES" "$REPORT" <<'PY'
import csv, statistics, sys
csv_path, meta_path, notes_path, report = sys.argv[1:5]
meta = dict(l.rstrip("\n").partition("=")[::2] for l in open(meta_path) if "=" in l)
notes = [l.rstrip("\n") for l in open(notes_path) if l.strip()]
rows = list(csv.DictReader(open(csv_path)))
med = statistics.median

WL = {
    "seqread": ("seq read 1 MiB × qd32, direct", "io_uring fixedbufs registerfiles", "--engine uring"),
    "seqwrite": ("seq write 1 MiB × qd32, direct", "io_uring fixedbufs registerfiles", "--engine uring"),
    "randread": ("rand read 4 KiB × qd32, direct", "io_uring fixedbufs registerfiles", "--engine uring"),
    "randread-psync": ("rand read 4 KiB × qd1, direct", "psync", "--engine fallback"),
    "seqread-psync": ("seq read 1 MiB × qd1, direct", "psync", "--engine fallback"),
    "meta": ("metadata, one file at a time per thread", "filecreate / filestat / filedelete", "--files N --engine fallback"),
    "meta-uring": ("metadata, fastsync qd32 (not the same workload)", "filecreate / filestat / filedelete", "--files N --engine uring"),
}
PHASE_ORDER = ["read", "write", "create", "stat", "open", "delete"]

def vals(wl, tool, phase, key):
    out = []
    for r in rows:
        if r["workload"] == wl and r["tool"] == tool and r["phase"] == phase and r["ok"] == "ok" and r[key] != "":
            out.append(float(r[key]))
    return out

def m(wl, tool, phase, key):
    v = vals(wl, tool, phase, key)
    return med(v) if v else None

def f(x, p=0):
    return "—" if x is None else f"{x:,.{p}f}"

def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b

def paired(wl, ph, key="iops"):
    by = {}
    for r in rows:
        if r["workload"] == wl and r["phase"] == ph and r["ok"] == "ok" and r[key] != "":
            by.setdefault(r["round"], {})[r["tool"]] = float(r[key])
    rs = [v["fastsync"] / v["fio"] for v in by.values() if v.get("fio") and "fastsync" in v]
    return (med(rs), min(rs), max(rs)) if rs else None

out = []
w = out.append
w(f"# fastsync bench vs fio — {meta.get('stamp')}")
w("")
w("## Machine and parameters")
w("")
w(f"- CPU: {meta.get('nproc')} × {meta.get('cpu')}; RAM {meta.get('ram')}; kernel {meta.get('kernel')}")
w(f"- Directory: `{meta.get('workdir')}`: {meta.get('fs')}")
w(f"- {meta.get('fio')}; fastsync `{meta.get('fastsync_bin')}` ({meta.get('fastsync')}, commit {meta.get('git')})")
w(f"- {meta.get('threads')} threads (fio `numjobs`), {meta.get('size')} per thread, {meta.get('time_s')} s per I/O run, "
  f"{meta.get('files')} files for the metadata workload; {meta.get('rounds')} rounds{' (--quick)' if meta.get('quick') == '1' else ''}; "
  f"load average {meta.get('load_start')} at the start, {meta.get('load_end')} at the end")
w("")
w("## Method")
w("")
w("- Both tools work on the same files, `DIR/fastsync-bench/io.N` (one per thread), written once before the rounds "
  "(`fastsync bench --keep`, untimed; fio gets `filename_format=fastsync-bench/io.$jobnum` and finds them at the right size, "
  "so it lays out nothing). All I/O is O_DIRECT, so the page cache plays no part.")
w(f"- fio: `--mem={meta.get('fio_mem')} --ioengine=io_uring --fixedbufs=1 --registerfiles=1 --iodepth_batch_submit=QD "
  "--iodepth_batch_complete_min=1 --iodepth_batch_complete_max=QD` (or `psync`) `--direct=1 --rw --bs --iodepth "
  "--numjobs=THREADS --size=SIZE --time_based --runtime=T --group_reporting --lat_percentiles=1 --output-format=json` "
  "(`--norandommap` for random reads: fastsync draws offsets uniformly with replacement). fastsync: "
  "`fastsync bench --engine uring|fallback --rw --bs --iodepth --threads --size --time --direct --keep --json DIR`. "
  "Buffer memory: fastsync's arena is 2 MiB-aligned with `MADV_HUGEPAGE`; fio's `mem=shmhuge` gives it huge pages too "
  "(with `malloc`, fio's default, its 1 MiB direct I/Os reach the device as up to 256 4 KiB segments and a virtio disk "
  "pays per segment). Submission: fastsync's shard reaps every completion there is and submits all freed slots in one "
  "`io_uring_enter`; fio's batch options above do the same (fio's default submits each I/O on its own, so adjacent "
  "sequential I/Os are never merged into one device request — see the device columns).")
w("- Metadata: fio runs four jobs one after the other, each `--nrfiles=N/THREADS --openfiles=1 --file_service_type=sequential "
  "--filesize=4k --bs=4k --numjobs=THREADS` in one directory per job (`meta.$jobnum/f$filenum`): `filecreate` (open(O_CREAT) + close; the "
  "files stay empty, fio refuses `filesize=0`), `filestat --stat_type=lstat --create_on_open=1`, `filecreate` again on the existing files "
  "(open + close: fastsync's `read` phase with `--file-size 0`, shown as **open**) and `filedelete --create_on_open=1` (unlink). "
  "Without `create_on_open=1` fio first \"lays out\" the empty files for filestat/filedelete (writes `filesize` bytes into each, "
  "untimed), so the unlinks free data blocks (p50 ~100 µs instead of ~7 µs); with fio's default `file_service_type=roundrobin` its "
  "time per file grows with nrfiles (it searches the file list for the next file to open): ~4,000 files/s at 10,000 files per job, "
  "mostly fio's own CPU. fastsync: "
  "`fastsync bench --files N --threads THREADS DIR/fastsync-meta` (one directory per thread), phases create, stat, read (= open + close), delete. "
  "Each run, of either tool, gets a new parent directory (`DIR/fio-meta`, `DIR/fastsync-meta`), removed afterwards: this ext4 has no "
  "journal, and creating inodes next to ones deleted in the last seconds to minutes is much slower there (`recently_deleted()`), so "
  "a reused directory would compare block groups, not tools. "
  "Before each metadata run (both tools): `sync; echo 3 > /proc/sys/vm/drop_caches`.")
w("- Latency: fastsync from submission to completion of each op; fio `lat` (submission + completion) for the I/O engines. "
  "The file engines record only the open/stat/unlink call in `clat` (not the close), fastsync the open + close: compare "
  "metadata latencies with that in mind.")
w("- **CPU s** = user + system CPU seconds of the measured window, as each tool reports it from `getrusage`: fastsync's "
  "`cpu_user_seconds + cpu_system_seconds` of the phase (the whole process, every thread, io_uring workers included); fio's "
  "`(usr_cpu + sys_cpu) / 100 × job_runtime` (each job's own rusage over its run time, summed over the jobs by "
  "group_reporting). This is the verdict's measure, the same for I/O and metadata phases. **proc CPU s** = GNU "
  "`/usr/bin/time` user + sys of the whole process (start-up, fio's parent process and helper thread included) — a cross-check "
  "for the I/O runs (a fastsync metadata run is one process for all phases).")
w("- Medians over the rounds; the tool that goes first alternates every round and workload. Ratio = median(fastsync) / median(fio); "
  "**paired** = the median of the per-round ratios (fastsync / fio of the same round, run back to back) with their min–max: "
  "where that range is wider than ±10%, the machine's noise is larger than the target.")
w("- Device columns (every run, from `/sys/block/DEV/stat`, the whole device): requests, mean KiB per request, mean time a request "
  "spent in the device (µs) and the mean number of requests in it (weighted time in queue / wall time).")
w("")

# Summary table (README-ready)
w("## Summary")
w("")
w("| workload | phase | fio MB/s | fastsync MB/s | fio IOPS | fastsync IOPS | IOPS ratio | paired (min–max) | p50 µs fio / fastsync | p99 µs fio / fastsync | CPU s fio / fastsync | CPU ratio | ±10% | CPU ≤ fio |")
w("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
verdicts = []
for wl in WL:
    phases = sorted({r["phase"] for r in rows if r["workload"] == wl}, key=lambda p: PHASE_ORDER.index(p) if p in PHASE_ORDER else 99)
    for ph in phases:
        fi, fs = m(wl, "fio", ph, "iops"), m(wl, "fastsync", ph, "iops")
        if fi is None and fs is None:
            continue
        fb, fsb = m(wl, "fio", ph, "mb_s"), m(wl, "fastsync", ph, "mb_s")
        fc, fsc = m(wl, "fio", ph, "cpu_s"), m(wl, "fastsync", ph, "cpu_s")
        ri, rc = ratio(fs, fi), ratio(fsc, fc)
        within = None if ri is None else abs(ri - 1) <= 0.10
        cpu_ok = None if rc is None else rc <= 1.0
        info = wl == "meta-uring"
        if not info:
            verdicts.append((wl, ph, within, cpu_ok, ri, rc))
        mb = lambda x: "—" if x is None or x == 0 else f"{x:,.1f}"
        yn = lambda b: "—" if b is None else ("yes" if b else "**no**")
        pr = paired(wl, ph)
        prs = "—" if pr is None else f"{pr[0]:.2f} ({pr[1]:.2f}–{pr[2]:.2f})"
        w(f"| {WL[wl][0]} | {ph} | {mb(fb)} | {mb(fsb)} | {f(fi)} | {f(fs)} | {f(ri, 2)} | {prs} | "
          f"{f(m(wl, 'fio', ph, 'p50_us'), 1)} / {f(m(wl, 'fastsync', ph, 'p50_us'), 1)} | "
          f"{f(m(wl, 'fio', ph, 'p99_us'), 1)} / {f(m(wl, 'fastsync', ph, 'p99_us'), 1)} | "
          f"{f(fc, 2)} / {f(fsc, 2)} | {f(rc, 2)} | {'(info) ' if info else ''}{yn(within)} | {'(info) ' if info else ''}{yn(cpu_ok)} |")
w("")
w("Metadata phases: **create** = open(O_CREAT) + close of a new empty file (fio's latency is the open only, fastsync's the "
  "open + close); **stat** = lstat / fstatat(AT_SYMLINK_NOFOLLOW); **open** = fio `filecreate` on the existing files, i.e. "
  "open(O_CREAT|O_RDWR) + close (O_CREAT takes the directory lock), against fastsync's open(O_RDONLY) + close: not quite the same "
  "call, fio has no read-only open engine; **delete** = unlink.")
w("")
w("Cross-check, whole-process CPU (GNU time, user + sys, median s per run): " + "; ".join(
    f"{WL[k][0]}: fio {f(m(k, 'fio', ph, 'proc_cpu_s'), 2)}, fastsync {f(m(k, 'fastsync', ph, 'proc_cpu_s'), 2)}"
    for k in WL if not k.startswith("meta") for ph in ("read", "write") if m(k, "fio", ph, "proc_cpu_s") is not None) + ".")
w("")
w("fio engine per workload: " + "; ".join(f"{WL[k][0]}: fio `{WL[k][1]}`, fastsync `{WL[k][2]}`" for k in WL
                                          if any(r["workload"] == k for r in rows)) + ".")
w("")
w("## Verdict")
w("")
for wl, ph, within, cpu_ok, ri, rc in verdicts:
    w(f"- {WL[wl][0]}, {ph}: IOPS within ±10% of fio: {'met' if within else 'MISSED'} ({f(ri, 2)}×); "
      f"no more CPU than fio: {'met' if cpu_ok else 'MISSED'} ({f(rc, 2)}×)")
w("")

# Per-run detail
w("## Every run")
w("")
w("| workload | round | order | tool | phase | IOPS | MB/s | p50 µs | p99 µs | CPU s | proc CPU s | wall s | load1 | dev requests | dev KiB | dev µs | dev QD |")
w("|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    g = lambda k: r[k] if r[k] != "" else "—"
    w(f"| {r['workload']} | {r['round']} | {r['order']} | {r['tool']} | {r['phase']} | {g('iops')} | {g('mb_s')} | "
      f"{g('p50_us')} | {g('p99_us')} | {g('cpu_s')} | {g('proc_cpu_s')} | {g('wall_s')} | {g('load1')} | "
      f"{g('dev_reqs')} | {g('dev_avg_kib')} | {g('dev_us')} | {g('dev_qd')} |")
w("")
fails = [r for r in rows if r["ok"] != "ok"]
if fails or notes:
    w("## Notes")
    w("")
    for r in fails:
        w(f"- FAILED: {r['workload']} round {r['round']} {r['tool']} {r['phase']} (see results/tmp/)")
    for n in notes:
        w(f"- {n}")
    w("")
w("The machine is shared and noisy: read medians and ratios, compare the tools only within one run, and check the load "
  "column; the raw runs are in the CSV, every tool's JSON in `results/tmp/`.")
open(report, "w").write("\n".join(out) + "\n")
PY
log "report: $REPORT"
