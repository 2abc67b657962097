#!/usr/bin/env bash
# scaling.sh — how fastsync's throughput scales with cores, copying between in-memory filesystems (tmpfs), so the
# disk is out of the picture and the engine, the kernel's copy paths and the CPU are what is measured.
#
#   perf-scripts/scaling.sh [--cores "1 2 4 8 16"] [--rounds 3] [--big-gib 4] [--small-files 100000] [--bin PATH]
#
# Needs root (it mounts two tmpfs under $FSB_SCALE_DIR, default /mnt/fastsync-scale) and enough RAM for the data
# set twice plus one copy. Writes perf-scripts/results/scaling-<date>.md and .csv. Core counts above nproc are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

cores_list="1 2 4 8 16"; rounds=3; big_gib=4; small_files=100000; bin=""
while (($#)); do
  case $1 in
    --cores) cores_list=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --big-gib) big_gib=$2; shift 2 ;;
    --small-files) small_files=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "scaling.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[[ $(id -u) == 0 ]] || { echo "scaling.sh: needs root to mount tmpfs" >&2; exit 1; }
if [[ -z $bin ]]; then
  cargo build --release --locked >&2
  bin=target/release/fastsync
fi
root=${FSB_SCALE_DIR:-/mnt/fastsync-scale}
stamp=$(date +%Y-%m-%d-%H%M%S)
out_md=perf-scripts/results/scaling-$stamp.md
out_csv=perf-scripts/results/scaling-$stamp.csv
mkdir -p perf-scripts/results "$root/src" "$root/dst"
mem_gib=$(( (big_gib * 2 + 4) ))
mountpoint -q "$root/src" || mount -t tmpfs -o size=${mem_gib}g tmpfs "$root/src"
mountpoint -q "$root/dst" || mount -t tmpfs -o size=${mem_gib}g tmpfs "$root/dst"
cleanup() { umount "$root/src" "$root/dst" 2>/dev/null || true; }
trap cleanup EXIT

echo "scaling: making data: ${big_gib} GiB in 8 large files, ${small_files} files of 1-64 KiB" >&2
mkdir -p "$root/src/big" "$root/src/small"
for i in $(seq 1 8); do
  head -c $((big_gib * 1024 / 8))M /dev/zero | openssl enc -aes-128-ctr -pass "pass:$i" -nosalt -pbkdf2 2>/dev/null \
    > "$root/src/big/f$i"
done
python3 - "$root/src/small" "$small_files" <<'PY'
import os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(42)
per_dir = 100
for i in range(n):
    d = os.path.join(root, f"d{i // (per_dir * 100)}", f"s{(i // per_dir) % 100}")
    if i % per_dir == 0:
        os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i}"), "wb") as f:
        f.write(rng.randbytes(rng.randint(1024, 65536)))
PY
big_bytes=$(du -sb "$root/src/big" | cut -f1)
small_bytes=$(du -sb --apparent-size "$root/src/small" | cut -f1)

echo "set,engine,cores,round,seconds,cpu_seconds" > "$out_csv"
nproc_max=$(nproc)
for set in big small; do
  for engine in uring fallback; do
    for cores in $cores_list; do
      ((cores <= nproc_max)) || continue
      for r in $(seq 1 "$rounds"); do
        d="$root/dst/$set-$engine-$cores-$r"
        t0=$(date +%s.%N)
        /usr/bin/time -f "%U %S" -o /tmp/scaling.time "$bin" copy -q --engine "$engine" --cores "$cores" \
          "$root/src/$set" "$d"
        t1=$(date +%s.%N)
        cpu=$(awk '{print $1 + $2}' /tmp/scaling.time)
        # Verify before counting: same bytes in the same places.
        if ! diff -rq "$root/src/$set" "$d" >/dev/null; then
          echo "scaling: $set $engine $cores cores round $r: output differs, not counted" >&2
        else
          echo "$set,$engine,$cores,$r,$(echo "$t1 - $t0" | bc),$cpu" >> "$out_csv"
        fi
        rm -rf "$d"
      done
    done
  done
done

python3 - "$out_csv" "$out_md" "$big_bytes" "$small_bytes" "$small_files" <<'PY'
import csv, statistics, sys, os, platform
path, md, big_bytes, small_bytes, small_files = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rows = list(csv.DictReader(open(path)))
med = {}
for r in rows:
    med.setdefault((r["set"], r["engine"], int(r["cores"])), []).append((float(r["seconds"]), float(r["cpu_seconds"])))
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
out = [f"# fastsync core scaling, tmpfs to tmpfs", "",
       f"Machine: {os.cpu_count()} cores ({cpu}), kernel {platform.release()}. Medians of the rounds; every copy "
       f"verified with `diff -r` before it counted.", ""]
for s, unit in (("big", "GB/s"), ("small", "files/s")):
    out += [f"## {s}: " + ("8 large files, %.1f GB" % (big_bytes / 1e9) if s == "big" else f"{small_files} files of 1-64 KiB"), "",
            f"| engine | cores | seconds | {unit} | speedup vs 1 core | CPU s |", "|---|---:|---:|---:|---:|---:|"]
    for e in ("uring", "fallback"):
        base = None
        for c in sorted({k[2] for k in med if k[0] == s and k[1] == e}):
            secs = statistics.median(x[0] for x in med[(s, e, c)])
            cpus = statistics.median(x[1] for x in med[(s, e, c)])
            base = base or secs
            rate = (big_bytes / secs / 1e9) if s == "big" else (small_files / secs)
            out.append(f"| {e} | {c} | {secs:.3f} | {rate:,.2f} | {base / secs:.2f}x | {cpus:.2f} |")
    out.append("")
open(md, "w").write("\n".join(out) + "\n")
print("\n".join(out))
PY
echo "scaling: wrote $out_md" >&2
