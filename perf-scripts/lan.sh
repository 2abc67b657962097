#!/usr/bin/env bash
# lan.sh — LAN transfer benchmark: fastsync push and pull (fastsync://) vs iperf3 (the link's limit), tar | nc,
# rsync daemon and rsync over ssh; one big random file and a tree of small files; on loopback and over a veth pair
# between two network namespaces with a `tc tbf` rate limit. Rotating order, N rounds, medians, ratios, CPU (client +
# server, user + sys) and peak RSS from GNU time; every output verified outside the timed region.
# See perf-scripts/README.md.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: perf-scripts/lan.sh [options]          (as root: namespaces, tc, drop_caches)

  --quick              smoke test: 512 MiB big file, 2,000 small files, 2 rounds
  --links LIST         loopback,veth                                   (default: both)
  --sets LIST          big,small                                       (default: both)
  --tools LIST         iperf3,nc,rsyncd,rsync-ssh,fastsync-push,fastsync-pull (default: all);
                       fastsync-push@MODE, fastsync-pull@MODE run both sides with FASTSYNC_ZEROCOPY=MODE
                       (off, sendfile, splice, both), so data paths alternate within one run
  --rounds N           rounds per link and set                          (default: 3)
  --streams N          TCP streams for fastsync (--streams) and iperf3 (-P) (default: 4)
  --rate RATE          tc tbf rate of the veth link, both directions    (default: 1gbit)
  --fresh-fs           every run's destination is a new ext4 made for it (see
                       local-copy.sh --fresh-fs), mounted where the copy goes
  --no-build           do not run `cargo build --release`
  --no-install         do not install missing tools with apt
  -h, --help           this text

Environment:
  FSB_DIR          work dir (data sets, served root, copies), default /var/tmp/fsbench
  FSB_BIN          fastsync binary to use (then nothing is built)
  FSB_BIG_MIB      size of the big file in MiB (default 4096; --quick: 512)
  FSB_SMALL_SHAPE  DIRSxSUBDIRSxFILES of the small tree (default 20x10x100; --quick: 20x10x10)
  FSB_TIMEOUT      seconds before one transfer counts as hung (default 900)
  FSB_KEEP=1       keep the data sets afterwards (shared with local-copy.sh)
  FSB_RESULTS      results dir (default perf-scripts/results)
  FSB_NOTE         a line added to the report

Output: perf-scripts/results/lan-<date>.md and .csv; logs in perf-scripts/results/tmp/lan-<date>/.
EOF
}

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=perf-scripts/lib.sh
source "$SCRIPT_DIR/lib.sh"
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
export PATH="$SCRIPT_DIR/.tools/bin:$PATH"

ROUNDS=${FSB_ROUNDS:-3}
BIG_MIB=${FSB_BIG_MIB:-4096}
SMALL_SHAPE=${FSB_SMALL_SHAPE:-20x10x100}
WORK=${FSB_DIR:-/var/tmp/fsbench}
RESULTS=${FSB_RESULTS:-$SCRIPT_DIR/results}
TIMEOUT=${FSB_TIMEOUT:-900}
LINKS=loopback,veth
SETS=big,small
ALL_TOOLS=iperf3,nc,rsyncd,rsync-ssh,fastsync-push,fastsync-pull
TOOLS=$ALL_TOOLS
STREAMS=4
RATE=1gbit
DO_BUILD=1
DO_INSTALL=1
QUICK=0
FRESH_FS=0

while (($#)); do
    case $1 in
        --quick) QUICK=1; ROUNDS=2; BIG_MIB=${FSB_BIG_MIB:-512}; SMALL_SHAPE=${FSB_SMALL_SHAPE:-20x10x10} ;;
        --links) LINKS=$2; shift ;;
        --sets) SETS=$2; shift ;;
        --tools) TOOLS=$2; shift ;;
        --rounds) ROUNDS=$2; shift ;;
        --streams) STREAMS=$2; shift ;;
        --rate) RATE=$2; shift ;;
        --fresh-fs) FRESH_FS=1 ;;
        --no-build) DO_BUILD=0 ;;
        --no-install) DO_INSTALL=0 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "rounds must be a positive integer: $ROUNDS"
[[ $STREAMS =~ ^[1-9][0-9]*$ ]] || die "streams must be a positive integer: $STREAMS"
[[ $BIG_MIB =~ ^[1-9][0-9]*$ ]] || die "FSB_BIG_MIB must be a positive integer: $BIG_MIB"
[[ $SMALL_SHAPE =~ ^[0-9]+x[0-9]+x[0-9]+$ ]] || die "FSB_SMALL_SHAPE must be AxBxC: $SMALL_SHAPE"
for l in ${LINKS//,/ }; do [[ $l == loopback || $l == veth ]] || die "unknown link: $l"; done
for s in ${SETS//,/ }; do [[ $s == big || $s == small ]] || die "unknown set: $s"; done
for t in ${TOOLS//,/ }; do
    [[ ,$ALL_TOOLS, == *,$t,* || $t =~ ^fastsync-(push|pull)@(off|sendfile|splice|both)$ ]] || die "unknown tool: $t"
done
[[ $(id -u) -eq 0 ]] || die "run as root (network namespaces, tc, drop_caches, a throwaway sshd)"

open_results lan
[[ -n ${FSB_NOTE:-} ]] && note "$FSB_NOTE"

# ---------------------------------------------------------------- 1. tools + build
missing=()
command -v iperf3 >/dev/null || missing+=(iperf3)
command -v nc >/dev/null || missing+=(netcat-openbsd)
command -v rsync >/dev/null || missing+=(rsync)
[[ -x /usr/sbin/sshd ]] || missing+=(openssh-server)
command -v ssh >/dev/null || missing+=(openssh-client)
command -v tc >/dev/null || missing+=(iproute2)
command -v ss >/dev/null || missing+=(iproute2)
[[ -x /usr/bin/time ]] || missing+=(time)
command -v openssl >/dev/null || missing+=(openssl)
if ((${#missing[@]})); then
    if ((DO_INSTALL)) && command -v apt-get >/dev/null; then
        log "apt-get install ${missing[*]}"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } \
            >"$LOGDIR/apt.log" 2>&1 || note "apt-get install ${missing[*]} failed (see $LOGDIR/apt.log)"
    else
        note "missing: ${missing[*]} (not installed)"
    fi
fi
[[ -x /usr/bin/time ]] || die "GNU time (/usr/bin/time) is required"
command -v python3 >/dev/null || die "python3 is required"
if command -v b3sum >/dev/null; then HASH=(b3sum); else HASH=(sha256sum); fi

fastsync_binary note

declare -a TOOL_LIST=()
for t in ${TOOLS//,/ }; do
    case $t in
        iperf3) command -v iperf3 >/dev/null && TOOL_LIST+=(iperf3) || note "iperf3 not installed: no link limit" ;;
        nc) command -v nc >/dev/null && TOOL_LIST+=(nc) || note "nc not installed: skipped" ;;
        rsyncd) command -v rsync >/dev/null && TOOL_LIST+=(rsyncd) || note "rsync not installed: skipped" ;;
        rsync-ssh)
            if command -v rsync >/dev/null && [[ -x /usr/sbin/sshd ]] && command -v ssh >/dev/null; then TOOL_LIST+=(rsync-ssh)
            else note "rsync over ssh skipped: rsync, sshd or ssh missing"; fi ;;
        fastsync-push | fastsync-pull | fastsync-push@* | fastsync-pull@*)
            if [[ -x $FASTSYNC ]]; then TOOL_LIST+=("$t"); else note "$t: $FASTSYNC not built, skipped"; fi ;;
    esac
done
((${#TOOL_LIST[@]})) || die "no tool to run"

mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
DATA="$WORK/data"
OUT_REL="lan-out-$STAMP"
OUT="$WORK/$OUT_REL"
mkdir -p "$DATA" "$OUT"

need_kib=$(((BIG_MIB * 1024 * 3) + 4 * 1024 * 1024))
avail_kib=$(df -Pk "$WORK" | awk 'NR==2 {print $4}')
((avail_kib > need_kib)) || die "$WORK has $((avail_kib / 1048576)) GiB free; need about $((need_kib / 1048576)) GiB"

tool_version() {
    case $1 in
        iperf3) iperf3 --version 2>&1 | head -n1 ;;
        nc) echo "tar $(tar --version | head -n1 | awk '{print $NF}') | nc ($(nc -h 2>&1 | head -n1))" ;;
        rsyncd) rsync --version | head -n1 | sed 's/  */ /g' ;;
        rsync-ssh) echo "$(rsync --version | head -n1 | sed 's/  */ /g') over $(ssh -V 2>&1)" ;;
        fastsync*) "$FASTSYNC" --version 2>/dev/null | head -n1 ;;
    esac
}
meta stamp "$STAMP"
meta nproc "$(nproc)"
meta cpu "$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
meta ram "$(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
meta kernel "$(uname -r)"
meta fs "$(findmnt -no FSTYPE -T "$WORK" 2>/dev/null || echo ?) on $(findmnt -no SOURCE -T "$WORK" 2>/dev/null || echo ?)"
meta rounds "$ROUNDS"
meta quick "$QUICK"
meta streams "$STREAMS"
meta rate "$RATE"
meta digest "${HASH[0]}"
meta binary "$FASTSYNC"
meta git "$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo ?)$(cd "$REPO" && git diff --quiet HEAD -- src engine uring fallback 2>/dev/null || echo '+dirty')"
for t in "${TOOL_LIST[@]}"; do meta "version_$t" "$(tool_version "$t")"; done
meta tools "${TOOL_LIST[*]}"
meta fresh_fs "$FRESH_FS"

# ---------------------------------------------------------------- links
NS_A=fsl-a-$$ # client
NS_B=fsl-b-$$ # server
IF_A=fsla$$
IF_B=fslb$$
VETH_A=198.18.9.1
VETH_B=198.18.9.2
PORT_BASE=$((20000 + RANDOM % 20000))
SRV_TPID=""
declare -a CLI_EXEC SRV_EXEC
SRV_IP=""

netns_down() {
    local ns p
    for ns in "$NS_A" "$NS_B"; do
        if ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$ns"; then
            for p in $(ip netns pids "$ns" 2>/dev/null); do kill "$p" 2>/dev/null || true; done
            ip netns del "$ns" 2>/dev/null || true
        fi
    done
}

netns_up() {
    netns_down
    ip netns add "$NS_A"
    ip netns add "$NS_B"
    ip link add "$IF_A" netns "$NS_A" type veth peer name "$IF_B" netns "$NS_B"
    ip -n "$NS_A" link set lo up
    ip -n "$NS_B" link set lo up
    ip -n "$NS_A" addr add "$VETH_A/30" dev "$IF_A"
    ip -n "$NS_B" addr add "$VETH_B/30" dev "$IF_B"
    ip -n "$NS_A" link set "$IF_A" up
    ip -n "$NS_B" link set "$IF_B" up
    # burst: one 1 ms timer tick at the rate, at least 64 KiB (as ../shared/tools/netns-wan.sh)
    local burst
    burst=$(python3 -c "
import re,sys
r=sys.argv[1].lower(); m=re.fullmatch(r'([0-9.]+)([kmg]?)bit',r)
bps=float(m.group(1))*{'':1,'k':1e3,'m':1e6,'g':1e9}[m.group(2)]
print(max(65536,int(bps/8/1000)))" "$RATE") || die "bad --rate $RATE (use e.g. 1gbit, 500mbit)"
    ip netns exec "$NS_A" tc qdisc add dev "$IF_A" root tbf rate "$RATE" burst "$burst" latency 10ms
    ip netns exec "$NS_B" tc qdisc add dev "$IF_B" root tbf rate "$RATE" burst "$burst" latency 10ms
    meta veth "veth $IF_A ($NS_A, $VETH_A) <-> $IF_B ($NS_B, $VETH_B), tbf rate $RATE burst $burst latency 10ms both directions"
}

use_link() { # loopback | veth
    case $1 in
        loopback) CLI_EXEC=(); SRV_EXEC=(); SRV_IP=127.0.0.1 ;;
        veth) netns_up; CLI_EXEC=(ip netns exec "$NS_A"); SRV_EXEC=(ip netns exec "$NS_B"); SRV_IP=$VETH_B ;;
    esac
}

stop_server() {
    [[ -n $SRV_TPID ]] || return 0
    local child
    for child in $(ps -o pid= --ppid "$SRV_TPID" 2>/dev/null); do kill -TERM "$child" 2>/dev/null || true; done
    wait "$SRV_TPID" 2>/dev/null || true
    SRV_TPID=""
}

cleanup() {
    local rc=$?
    stop_server
    fresh_fs_down
    netns_down
    rm -rf "$OUT" 2>/dev/null || true
    rm -f "$LOGDIR"/*.manifest "$LOGDIR"/time.* 2>/dev/null || true
    if [[ ${FSB_KEEP:-0} != 1 ]]; then
        rm -rf "$DATA" 2>/dev/null || true
        rmdir "$WORK" 2>/dev/null || true
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- data sets (same files as local-copy.sh)
if ((BIG_MIB % 1024 == 0)); then BIG="$DATA/big-$((BIG_MIB / 1024))g.bin"; else BIG="$DATA/big-${BIG_MIB}m.bin"; fi
BIG_BYTES=$((BIG_MIB * 1024 * 1024))
SMALL="$DATA/small-$SMALL_SHAPE"

make_big() {
    if [[ -f $BIG.ok && $(stat -c %s "$BIG" 2>/dev/null || echo 0) -eq $BIG_BYTES ]]; then log "reusing $BIG"; return; fi
    rm -f "$BIG" "$BIG.ok"
    log "generating $BIG ($BIG_MIB MiB of AES-CTR keystream)"
    openssl enc -aes-128-ctr -pass pass:fastsync-bench -nosalt -pbkdf2 -in /dev/zero 2>/dev/null |
        dd of="$BIG" bs=1M count="$BIG_MIB" iflag=fullblock status=none || true
    [[ $(stat -c %s "$BIG") -eq $BIG_BYTES ]] || die "big file has the wrong size"
    touch "$BIG.ok"
}

manifest() { # dir: sorted (type, path, size | link target), then sorted digests
    (
        cd "$1"
        find . -mindepth 1 \( -type f -printf 'f\t%P\t%s\n' \) -o \( -type d -printf 'd\t%P\n' \) \
            -o \( -type l -printf 'l\t%P\t%l\n' \) -o -printf '?\t%P\n' | LC_ALL=C sort
        find . -type f -print0 | xargs -0 -r -n 256 -P "$(nproc)" "${HASH[@]}" | LC_ALL=C sort -k2
    )
}
meta_manifest() { # mode and mtime (s) of everything but symlinks: reported, not enforced
    if [[ -d $1 ]]; then
        (cd "$1" && find . -mindepth 1 ! -type l -printf '%P\t%m\t%T@\n' | sed 's/\.[0-9]*$//' | LC_ALL=C sort)
    else
        stat -c '%a %Y' "$1"
    fi
}

declare -A SRC_PATH SRC_BYTES SRC_FILES SRC_KIND
for s in ${SETS//,/ }; do
    case $s in
        big) make_big; SRC_PATH[big]=$BIG; SRC_KIND[big]=file ;;
        small) make_small; SRC_PATH[small]=$SMALL; SRC_KIND[small]=tree ;;
    esac
    src=${SRC_PATH[$s]}
    log "digesting source of set $s"
    if [[ ${SRC_KIND[$s]} == file ]]; then
        "${HASH[@]}" <"$src" | cut -d' ' -f1 >"$LOGDIR/src-$s.manifest"
        SRC_BYTES[$s]=$(stat -c %s "$src")
        SRC_FILES[$s]=1
        meta "set_${s}_desc" "one $BIG_MIB MiB file of random data"
    else
        manifest "$src" >"$LOGDIR/src-$s.manifest"
        SRC_BYTES[$s]=$(awk -F'\t' '$1=="f" {s+=$3} END {printf "%d", s}' "$LOGDIR/src-$s.manifest")
        SRC_FILES[$s]=$(awk -F'\t' '$1=="f" {n++} END {print n+0}' "$LOGDIR/src-$s.manifest")
        meta "set_${s}_desc" "tree $SMALL_SHAPE (dirs x subdirs x files) of 1-64 KiB random files"
    fi
    meta_manifest "$src" >"$LOGDIR/src-$s.meta"
    meta "set_${s}_bytes" "${SRC_BYTES[$s]}"
    meta "set_${s}_files" "${SRC_FILES[$s]}"
done

# ---------------------------------------------------------------- servers' config
TOKEN="$LOGDIR/token"
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$TOKEN"
chmod 600 "$TOKEN"
SSHD="$LOGDIR/ssh"
mkdir -p "$SSHD" /run/sshd
chmod 700 "$SSHD"
chmod 755 /run/sshd
ssh-keygen -q -t ed25519 -N '' -f "$SSHD/host_ed25519"
ssh-keygen -q -t ed25519 -N '' -f "$SSHD/id_ed25519"
cp "$SSHD/id_ed25519.pub" "$SSHD/authorized_keys"
chmod 600 "$SSHD/authorized_keys"
cat >"$LOGDIR/rsyncd.conf" <<EOF
use chroot = no
uid = root
gid = root
max connections = 16
[lan]
  path = $OUT
  read only = no
EOF

PORT_IPERF=$PORT_BASE PORT_NC=$((PORT_BASE + 1)) PORT_RSYNCD=$((PORT_BASE + 2)) PORT_SSH=$((PORT_BASE + 3))
PORT_FS=$((PORT_BASE + 4))

ssh_config() { # for the current SRV_IP
    cat >"$SSHD/sshd_config" <<EOF
Port $PORT_SSH
ListenAddress $SRV_IP
HostKey $SSHD/host_ed25519
PidFile none
AuthorizedKeysFile $SSHD/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
LogLevel ERROR
EOF
    echo "[$SRV_IP]:$PORT_SSH $(cut -d' ' -f1,2 "$SSHD/host_ed25519.pub")" >"$SSHD/known_hosts"
    cat >"$SSHD/ssh_config" <<EOF
Host fs-lan
  HostName $SRV_IP
  Port $PORT_SSH
  User root
  IdentityFile $SSHD/id_ed25519
  IdentitiesOnly yes
  UserKnownHostsFile $SSHD/known_hosts
  StrictHostKeyChecking yes
  BatchMode yes
EOF
}

# fastsync-push@MODE / fastsync-pull@MODE: FASTSYNC_ZEROCOPY=MODE for client and server (one word, for env)
zc_env() { # tool
    if [[ $1 == *@* ]]; then echo "FASTSYNC_ZEROCOPY=${1#*@}"; else echo "-u" "FASTSYNC_ZEROCOPY"; fi
}

# start the server side of TOOL under GNU time, in the server namespace; wait until it listens
start_server() { # tool dst_dir log
    local tool=$1 dst=$2 lg=$3 port
    local -a cmd
    case $tool in
        iperf3) port=$PORT_IPERF; cmd=(iperf3 -s -1 -B "$SRV_IP" -p "$port") ;;
        nc) port=$PORT_NC; cmd=(bash -c 'nc -l "$1" "$2" | tar x -C "$3"' nc-recv "$SRV_IP" "$port" "$dst") ;;
        rsyncd) port=$PORT_RSYNCD
            cmd=(rsync --daemon --no-detach --address="$SRV_IP" --port="$port" --config="$LOGDIR/rsyncd.conf" --log-file=/dev/null) ;;
        rsync-ssh) port=$PORT_SSH; cmd=(/usr/sbin/sshd -D -e -f "$SSHD/sshd_config") ;;
        fastsync-*) port=$PORT_FS
            cmd=(env -u FASTSYNC_TOKEN $(zc_env "$tool") "$FASTSYNC" serve "$WORK" --listen "$SRV_IP:$port" --token-file "$TOKEN") ;;
    esac
    "${SRV_EXEC[@]}" /usr/bin/time -f '%e %U %S %M' -o "$LOGDIR/time.srv" "${cmd[@]}" </dev/null >"$lg" 2>&1 &
    SRV_TPID=$!
    local i
    for ((i = 0; i < 200; i++)); do
        if [[ -n $("${SRV_EXEC[@]}" ss -Hltn "sport = :$port" 2>/dev/null) ]]; then return 0; fi
        kill -0 "$SRV_TPID" 2>/dev/null || break
        sleep 0.05
    done
    log "server of $tool did not start listening on $SRV_IP:$port: $(tail -n3 "$lg" | tr '\n' ' ')"
    stop_server
    return 1
}

# the client command of TOOL: SRC (local path or served path) -> DST
declare -a CMD
client_cmd() { # tool set dst_dir(abs)
    local tool=$1 s=$2 dst=$3 src=${SRC_PATH[$2]} kind=${SRC_KIND[$2]} rel
    rel=${dst#"$WORK"/}
    local name=""
    [[ $kind == file ]] && name=/$(basename "$src")
    case $tool in
        iperf3) CMD=(iperf3 -c "$SRV_IP" -p "$PORT_IPERF" -P "$STREAMS" -n "${SRC_BYTES[$s]}" -J) ;;
        nc) CMD=(bash -c 'tar c -C "$1" "$2" | nc -N "$3" "$4"' nc-send "$(dirname "$src")" "$(basename "$src")" "$SRV_IP" "$PORT_NC") ;;
        rsyncd)
            if [[ $kind == file ]]; then CMD=(rsync -a "$src" "rsync://$SRV_IP:$PORT_RSYNCD/lan/${rel#"$OUT_REL"/}/")
            else CMD=(rsync -a "$src/" "rsync://$SRV_IP:$PORT_RSYNCD/lan/${rel#"$OUT_REL"/}/"); fi ;;
        rsync-ssh)
            if [[ $kind == file ]]; then CMD=(rsync -a -e "ssh -F $SSHD/ssh_config" "$src" "fs-lan:$dst/")
            else CMD=(rsync -a -e "ssh -F $SSHD/ssh_config" "$src/" "fs-lan:$dst/"); fi ;;
        fastsync-push | fastsync-push@*)
            CMD=(env -u FASTSYNC_TOKEN $(zc_env "$tool") "$FASTSYNC" copy --json --streams "$STREAMS" --token-file "$TOKEN" "$src"
                "fastsync://$SRV_IP:$PORT_FS/$rel$name") ;;
        fastsync-pull | fastsync-pull@*)
            CMD=(env -u FASTSYNC_TOKEN $(zc_env "$tool") "$FASTSYNC" copy --json --streams "$STREAMS" --token-file "$TOKEN"
                "fastsync://$SRV_IP:$PORT_FS/${src#"$WORK"/}" "$dst$name") ;;
    esac
}

verify() { # set dst_dir -> 0 ok; VERIFY_MSG, META_OK
    local s=$1 dst=$2 src=${SRC_PATH[$1]}
    VERIFY_MSG="" META_OK=""
    local tmps
    tmps=$(find "$dst" -name '*.fstmp-*' 2>/dev/null | head -3 | tr '\n' ' ')
    [[ -z $tmps ]] || { VERIFY_MSG="temporaries left: $tmps"; return 1; }
    if [[ ${SRC_KIND[$s]} == file ]]; then
        local f
        f="$dst/$(basename "$src")"
        [[ -f $f ]] || { VERIFY_MSG="no output file $f"; return 1; }
        [[ $(stat -c %s "$f") -eq ${SRC_BYTES[$s]} ]] || { VERIFY_MSG="size $(stat -c %s "$f") != ${SRC_BYTES[$s]}"; return 1; }
        [[ $("${HASH[@]}" <"$f" | cut -d' ' -f1) == "$(cat "$LOGDIR/src-$s.manifest")" ]] ||
            { VERIFY_MSG="content digest differs"; return 1; }
        if [[ $(meta_manifest "$f") == "$(cat "$LOGDIR/src-$s.meta")" ]]; then META_OK=yes; else META_OK=no; fi
    else
        local d=$dst
        [[ $(basename "$src") == "$(ls "$dst" 2>/dev/null)" && -d $dst/$(basename "$src") ]] && d="$dst/$(basename "$src")" # tar
        manifest "$d" >"$LOGDIR/last.manifest"
        if ! cmp -s "$LOGDIR/last.manifest" "$LOGDIR/src-$s.manifest"; then
            VERIFY_MSG="tree differs: $(diff "$LOGDIR/src-$s.manifest" "$LOGDIR/last.manifest" | grep -c '^[<>]') manifest lines"
            return 1
        fi
        if cmp -s <(meta_manifest "$d") "$LOGDIR/src-$s.meta"; then META_OK=yes; else META_OK=no; fi
    fi
}

preread() { # warm source: every tool reads from the page cache
    if [[ ${SRC_KIND[$1]} == file ]]; then cat "${SRC_PATH[$1]}" >/dev/null
    else find "${SRC_PATH[$1]}" -type f -print0 | xargs -0 -r -n 512 cat >/dev/null; fi
}

echo "stamp,link,set,round,position,tool,status,wall_s,wall_sync_s,cli_user_s,cli_sys_s,srv_user_s,srv_sys_s,cpu_s,cli_rss_kib,srv_rss_kib,bytes,files,iperf_bps,meta_preserved,note" >"$CSV"

run_one() { # link set round position tool
    local link=$1 s=$2 r=$3 pos=$4 tool=$5
    local dst="$OUT/$link-$s-r$r/$tool" lg="$LOGDIR/$link-$s-r$r-$tool"
    mkdir -p "$dst"
    ((FRESH_FS)) && fresh_fs_up "$dst" "${SRC_BYTES[$s]}" "$(fs_journal "$WORK")"
    [[ $tool == rsync-ssh ]] && ssh_config
    client_cmd "$tool" "$s" "$dst"
    printf '%q ' "${CMD[@]}" >"$lg.cmd"
    echo >>"$lg.cmd"
    preread "$s"
    sync
    rm -f "$LOGDIR/time.srv" "$LOGDIR/time.cli"
    local status=ok note="" rc=0
    META_OK=""
    if ! start_server "$tool" "$dst" "$lg.srv.log"; then
        status=FAILED note="server did not start: $(tail -n1 "$lg.srv.log" | tr ',\n' '; ' | cut -c1-160)"
    else
        local t0 t1 t2
        t0=$(date +%s%N)
        "${CLI_EXEC[@]}" /usr/bin/time -f '%e %U %S %M' -o "$LOGDIR/time.cli" timeout "$TIMEOUT" "${CMD[@]}" \
            </dev/null >"$lg.out" 2>"$lg.err" || rc=$?
        # one-shot receivers (iperf3 -s -1, nc | tar x) end by themselves: the transfer ends when they do
        if [[ $tool == iperf3 || $tool == nc ]]; then
            local i
            for ((i = 0; i < 600; i++)); do kill -0 "$SRV_TPID" 2>/dev/null || break; sleep 0.05; done
        fi
        t1=$(date +%s%N)
        sync
        t2=$(date +%s%N)
        stop_server
        if ((rc != 0)); then
            status=FAILED note="exit status $rc: $(grep -v '^Command exited' "$lg.err" | tail -n1 | tr ',\n' '; ' | cut -c1-200)"
        elif [[ $tool == iperf3 ]]; then
            # iperf3 writes nothing there; a fresh filesystem's mount point goes with fresh_fs_down
            ((FRESH_FS)) || rm -rf "$dst"
        elif ! verify "$s" "$dst"; then
            status=FAILED note="verify: $VERIFY_MSG"
        fi
    fi
    ((FRESH_FS)) && fresh_fs_down
    if [[ $status != ok ]]; then
        log "$link/$s r$r $(printf '%-14s' "$tool") FAILED ($note); command: $(cat "$lg.cmd")"
        echo "$STAMP,$link,$s,$r,$pos,$tool,FAILED,,,,,,,,,,${SRC_BYTES[$s]},${SRC_FILES[$s]},,,\"${note//\"/\'}\"" >>"$CSV"
        return
    fi
    local wall wsync cu cs cr su ss sr bps=""
    wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", (b-a)/1e9}')
    wsync=$(awk -v a="$t0" -v b="$t2" 'BEGIN {printf "%.3f", (b-a)/1e9}')
    read -r _ cu cs cr < <(tail -n1 "$LOGDIR/time.cli")
    read -r _ su ss sr < <(tail -n1 "$LOGDIR/time.srv" 2>/dev/null || echo "0 0 0 0")
    if [[ $tool == iperf3 ]]; then
        bps=$(python3 -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["end"]["sum_received"]["bits_per_second"]))' "$lg.out" 2>/dev/null || echo "")
        note="iperf3 receiver $(awk -v b="$bps" 'BEGIN {printf "%.2f Gbit/s", b/1e9}')"
    elif [[ $tool == fastsync-* ]]; then
        note="engine=$(grep -o '"engine":"[a-z_]*"' "$lg.out" | tail -n1 | cut -d'"' -f4 || true)"
    fi
    local cpu
    cpu=$(awk -v a="$cu" -v b="$cs" -v c="$su" -v d="$ss" 'BEGIN {printf "%.2f", a+b+c+d}')
    log "$link/$s r$r $(printf '%-14s' "$tool") ${wall}s (+sync ${wsync}s)  $(awk -v b="${SRC_BYTES[$s]}" -v w="$wall" 'BEGIN {printf "%.0f MB/s", b/w/1e6}')  cpu ${cpu}s  rss $((cr / 1024))/$((sr / 1024)) MiB  meta:${META_OK:--} $note"
    echo "$STAMP,$link,$s,$r,$pos,$tool,ok,$wall,$wsync,$cu,$cs,$su,$ss,$cpu,$cr,$sr,${SRC_BYTES[$s]},${SRC_FILES[$s]},$bps,${META_OK:-},$note" >>"$CSV"
}

NT=${#TOOL_LIST[@]}
for link in ${LINKS//,/ }; do
    use_link "$link"
    for s in ${SETS//,/ }; do
        for ((r = 1; r <= ROUNDS; r++)); do
            for ((i = 0; i < NT; i++)); do
                run_one "$link" "$s" "$r" "$((i + 1))" "${TOOL_LIST[$(((i + r - 1) % NT))]}"
            done
            # outside the timed region: delete the round's copies, then drop the page cache (ext4's
            # recently-deleted-inode check, see README) — the next run pre-reads its source again
            rm -rf "$OUT/$link-$s-r$r"
            sync
            sleep 1
            echo 1 >/proc/sys/vm/drop_caches
        done
    done
    [[ $link == veth ]] && netns_down
done

# ---------------------------------------------------------------- report
python3 - "$CSV" "$META" "$NOTES" "$REPORT" <<'PY'
import csv, os, statistics, sys
csv_path, meta_path, notes_path, report = sys.argv[1:5]
meta = dict(l.rstrip("\n").split("=", 1) for l in open(meta_path) if "=" in l)
notes = [l.rstrip("\n") for l in open(notes_path) if l.strip()]
rows = list(csv.DictReader(open(csv_path)))
med = statistics.median
out = []
w = out.append

def f(x, p=2):
    return "—" if x is None else f"{x:.{p}f}"

def rate(b, s):  # bytes, seconds -> human string
    v = b / s
    return f"{v / 1e9:.2f} GB/s" if v >= 1e9 else f"{v / 1e6:.0f} MB/s"

w(f"# LAN transfer benchmark — {meta.get('stamp')}")
w("")
w("## Machine and setup")
w("")
w(f"- CPU: {meta.get('nproc')} × {meta.get('cpu')}; RAM {meta.get('ram')}; kernel {meta.get('kernel')}; disk {meta.get('fs')}")
w(f"- fastsync: `{meta.get('binary')}` ({meta.get('version_fastsync-push') or meta.get('version_fastsync-pull') or '?'}), git {meta.get('git')}")
for k, v in sorted(meta.items()):
    if k.startswith("version_") and not k.startswith("version_fastsync"):
        w(f"- {k[8:]}: {v}")
w(f"- rounds: {meta.get('rounds')} (quick: {'yes' if meta.get('quick') == '1' else 'no'}); streams: {meta.get('streams')} "
  f"(`fastsync --streams`, `iperf3 -P`); digest for verification: {meta.get('digest')}")
w("- links: **loopback** — client and server in the root namespace on 127.0.0.1 (MTU 65536); "
  f"**veth** — {meta.get('veth', 'veth pair with tc tbf (not run)')}")
for k in ("big", "small"):
    if f"set_{k}_bytes" in meta:
        w(f"- set **{k}**: {meta[f'set_{k}_desc']}: {int(meta[f'set_{k}_files']):,} files, {int(meta[f'set_{k}_bytes']) / 1e9:.3f} GB")
w("")
w("Every tool pushes from the client side to the server side, except `fastsync-pull` (server → client). "
  "Client and server share the same 2 cores and the same disk: this measures CPU cost per byte as much as the link.")
w("")
w("Columns: wall = median seconds from the client's start to the end of the transfer (for `tar|nc` and iperf3: until "
  "the receiver exits); +sync = the same followed by `sync` (the receiver's dirty pages written); throughput = bytes / "
  "median wall; CPU = user + sys of client and server together (GNU time over each process tree; daemons are "
  "started per run); CPU s/GB = CPU per 10^9 bytes; RSS = peak resident set of the largest process, client / server.")
w("")
targets = []
for link in ("loopback", "veth"):
    for s in ("big", "small"):
        sub = [r for r in rows if r["link"] == link and r["set"] == s]
        if not sub:
            continue
        nbytes = int(sub[0]["bytes"])
        w(f"## {link} — {s}")
        w("")
        tools = list(dict.fromkeys(r["tool"] for r in sub))
        st = {}
        for t in tools:
            ok = [r for r in sub if r["tool"] == t and r["status"] == "ok"]
            n = len([r for r in sub if r["tool"] == t])
            if not ok:
                st[t] = dict(ok=0, n=n)
                continue
            wall = med(float(r["wall_s"]) for r in ok)
            st[t] = dict(ok=len(ok), n=n, wall=wall, wmin=min(float(r["wall_s"]) for r in ok),
                         wmax=max(float(r["wall_s"]) for r in ok), wsync=med(float(r["wall_sync_s"]) for r in ok),
                         cpu=med(float(r["cpu_s"]) for r in ok),
                         ccpu=med(float(r["cli_user_s"]) + float(r["cli_sys_s"]) for r in ok),
                         scpu=med(float(r["srv_user_s"]) + float(r["srv_sys_s"]) for r in ok),
                         crss=max(int(r["cli_rss_kib"]) for r in ok) / 1024, srss=max(int(r["srv_rss_kib"] or 0) for r in ok) / 1024,
                         meta=",".join(sorted({r["meta_preserved"] for r in ok if r["meta_preserved"]})) or "—",
                         bps=[int(r["iperf_bps"]) for r in ok if r["iperf_bps"]])
        lim = None
        if "iperf3" in st and st["iperf3"]["ok"] and st["iperf3"]["bps"]:
            lim = med(st["iperf3"]["bps"]) / 8  # bytes/s the receiver saw
        ref = st.get("rsyncd", {}).get("wall")
        hdr = ["tool", "ok", "wall s (min–max)", "+sync s", "throughput", "CPU s (cli+srv)", "CPU s/GB", "RSS MiB cli/srv"]
        hdr.append("% of iperf3" if s == "big" else "× rsyncd")
        hdr.append("mode+mtime kept")
        w("| " + " | ".join(hdr) + " |")
        w("|" + "|".join(["---"] + ["---:"] * (len(hdr) - 2) + ["---"]) + "|")
        for t in tools:
            x = st[t]
            if not x["ok"]:
                w("| " + " | ".join([f"`{t}`", f"0/{x['n']}", "**FAILED**"] + ["—"] * (len(hdr) - 3)) + " |")
                continue
            tp = nbytes / x["wall"]
            if t == "iperf3":
                thr = rate(nbytes, x["wall"]) + (f" (iperf3: {lim * 8 / 1e9:.2f} Gbit/s = {rate(lim, 1)})" if lim else "")
            else:
                thr = rate(nbytes, x["wall"])
            if s == "big":
                rel = f"{100 * tp / lim:.0f}%" if lim and t != "iperf3" else ("100% (ref)" if t == "iperf3" and lim else "—")
            else:
                rel = (f"{ref / x['wall']:.2f}×" if ref and t not in ("rsyncd", "iperf3") else ("1.00× (ref)" if t == "rsyncd" else "—"))
            cells = [f"`{t}`", f"{x['ok']}/{x['n']}", f"{f(x['wall'])} ({f(x['wmin'])}–{f(x['wmax'])})", f(x["wsync"]), thr,
                     f"{f(x['cpu'])} ({f(x['ccpu'])}+{f(x['scpu'])})", f(x["cpu"] / (nbytes / 1e9)),
                     f"{x['crss']:.0f} / {x['srss']:.0f}", rel, x["meta"] if t != "iperf3" else "—"]
            w("| " + " | ".join(cells) + " |")
            if t.startswith("fastsync"):
                if s == "big" and lim:
                    pct = 100 * tp / lim
                    targets.append(f"{link}/{s}: `{t}` at {pct:.0f}% of iperf3 -P {meta.get('streams')} — target ≥ 90%: {'**met**' if pct >= 90 else '**missed**'}")
                if s == "small" and ref:
                    ratio = ref / x["wall"]
                    targets.append(f"{link}/{s}: `{t}` {ratio:.2f}× rsync daemon — target ≥ 3×: {'**met**' if ratio >= 3 else '**missed**'}")
        fails = [r for r in sub if r["status"] != "ok"]
        if fails:
            w("")
            for r in fails:
                w(f"- FAILED: `{r['tool']}` round {r['round']}: {r['note']}")
        w("")
if targets:
    w("## Targets (issue 4)")
    w("")
    for t in targets:
        w(f"- {t}")
    w("")
w("## Notes and caveats")
w("")
w("- The machine is shared and noisy: compare tools only within one run; read medians and ratios; the CSV has every round.")
w("- The big file's target is against iperf3 with as many streams as fastsync uses: memory to memory, nothing hashed, "
  "nothing written; fastsync also hashes every chunk with BLAKE3 and writes a file. The small files' target is against "
  "the rsync daemon (no ssh cipher in the way).")
if meta.get('fresh_fs') == '1':
    w("- Sources are warm (read into the page cache before each run). `--fresh-fs`: every run's destination is a new ext4 "
      "made for it (loop image on the same disk, direct-I/O loop device, inode tables written at mkfs), mounted where the "
      "copy goes before the server starts and removed after verification: the work dir's aged ext4 (its recently-deleted-inode "
      "scan in every create) plays no part.")
else:
    w("- Sources are warm (read into the page cache before each run); destinations are new directories; after each round the "
      "copies are deleted, then `sync` and a page-cache drop (ext4's recently-deleted-inode check; see above).")
w("- Verification outside the timed region: big file by size and content digest; trees by a sorted list of (type, path, "
  "size / link target) and every file's digest; no `.fstmp-` temporaries. A non-zero exit or a wrong output is FAILED and not timed.")
w("- `tar | nc` keeps modes and mtimes (tar), `rsync -a` too; `mode+mtime kept` is reported, not enforced.")
for n in notes:
    w(f"- {n}")
w("")
w(f"Raw per-round numbers: `{os.path.basename(csv_path)}`.")
text = "\n".join(out) + "\n"
open(report, "w").write(text)
print(text)
PY
log "report: $REPORT"
log "raw:    $CSV"
