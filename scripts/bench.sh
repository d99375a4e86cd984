#!/usr/bin/env bash
# Moat vs Postfix, side by side on this machine, in the same run. A benchmark, not a test.
#
#   scripts/bench.sh                       # full run: 10,000 messages of 4 KiB per cell
#   BENCH_MESSAGES=1000 scripts/bench.sh   # quick run
#
# Environment:
#   BENCH_MESSAGES  messages per cell (10000)        BENCH_SIZE      body bytes (4096)
#   BENCH_SESSIONS  session counts ("1 10 50")       BENCH_PATHS     "plain tls"
#   BENCH_REPEAT    runs per cell, median kept (1)   BENCH_IDLE      idle TLS connections (1000)
#   BENCH_LARGE_SESSIONS / BENCH_LARGE_SIZE  sessions held inside a large DATA (40, 8 MiB; 0: skip)
#   BENCH_MOAT_LOG  Moat's MOAT_LOG filter (info)    BENCH_KEEP=1    keep the work dir
#   BENCH_TLS_ARGS  extra loadgen options, e.g. "--x25519-only"
#   BENCH_WORKERS   worker threads of Moat (`worker_threads`) and of both sinks; default: one
#                   per core. With the load client on the same 2 cores, 1 leaves it the other.
#   BENCH_NO_BUILD=1  skip cargo build and run the release binaries already there
#
# What runs (all on loopback, nothing else is touched):
#   Moat     release build, 127.0.0.20:2525, `bench.test` routed to `discard`: every message is
#            in the spool journal, synced (fdatasync, shared by the messages of a batch),
#            before the 250, then marked delivered.
#   Postfix  its own config dir, 127.0.0.21:25, TLS with a self-signed ECDSA P-256 certificate
#            (Moat makes the same kind), `bench.test` in relay_domains with transport
#            `discard:`: every message is queued by cleanup (fsync before the 250), then the
#            discard agent removes it. No rate or connection limits; in_flow_delay = 0.
#   Load     plain: `smtp-source -l SIZE -m N -s SESS -f a@x.test -t b@bench.test HOST:PORT`
#            (no -d, so ONE CONNECTION PER MESSAGE, for both servers alike).
#            tls:   `loadgen --starttls --per-message`: one connection and one full TLS
#            handshake (no resumption) per message, one write per command, TCP_QUICKACK
#            re-armed before each reply (without it every Postfix TLS session stalls 40 ms:
#            Postfix's reply waits behind Nagle for our delayed ACK of its session ticket;
#            add BENCH_TLS_ARGS=--no-quickack to see it).
#   Ceilings (same loads, same run): `examples/tls_sink.rs`, an SMTP sink with STARTTLS that
#            parses nothing beyond the verb and queues nothing, twice:
#            sink   127.0.0.42:2601, keeps nothing: the most this client and machine allow;
#            dsink  127.0.0.43:2602, `--sync`: writes each message into a preallocated ring and
#                   syncs it (one fdatasync per batch, like Moat) before the 250: the most a
#                   durable server can do here. A row whose "4x Postfix" is above a ceiling
#                   cannot reach 4x on this machine, whatever the server.
#   Both clients send one command at a time (no PIPELINING) and run on the same 2 cores as
#   the servers, so absolute numbers include the client's CPU; compare the ratios.
#   For each cell the two servers run back to back (order alternates), each queue is
#   drained before the next run, and accepted/delivered counts are checked from the logs.
set -euo pipefail

MESSAGES=${BENCH_MESSAGES:-10000}
SIZE=${BENCH_SIZE:-4096}
SESSIONS=${BENCH_SESSIONS:-"1 10 50"}
PATHS=${BENCH_PATHS:-"plain tls"}
REPEAT=${BENCH_REPEAT:-1}
IDLE=${BENCH_IDLE:-1000}
LARGE_SESSIONS=${BENCH_LARGE_SESSIONS:-40} LARGE_SIZE=${BENCH_LARGE_SIZE:-8388608}
MOAT_LOG_FILTER=${BENCH_MOAT_LOG:-info}
TLS_ARGS=${BENCH_TLS_ARGS:-}
WORKERS=${BENCH_WORKERS:-0}
[[ $WORKERS =~ ^[0-9]+$ ]] || { echo "BENCH_WORKERS must be a number" >&2; exit 1; }
MOAT_IP=127.0.0.20 MOAT_PORT=2525
PF_IP=127.0.0.21 PF_PORT=25
SINK_IP=127.0.0.42 SINK_PORT=2601
DSINK_IP=127.0.0.43 DSINK_PORT=2602

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
MOAT_BIN=$CARGO_TARGET_DIR/release/moat
LOADGEN=$CARGO_TARGET_DIR/release/examples/loadgen
SINK_BIN=$CARGO_TARGET_DIR/release/examples/tls_sink

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- install what is missing
need=()
command -v smtp-source >/dev/null && command -v postfix >/dev/null || need+=(postfix)
command -v pgrep >/dev/null && command -v uptime >/dev/null || need+=(procps)
command -v openssl >/dev/null || need+=(openssl)
command -v script >/dev/null || need+=(bsdutils)
command -v ss >/dev/null || need+=(iproute2)
command -v bc >/dev/null || need+=(bc)
if ((${#need[@]})); then
    log "installing ${need[*]}"
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null || die "cargo not found"

# ---------------------------------------------------------------- build
if [[ ${BENCH_NO_BUILD:-0} == 1 ]]; then
    log "BENCH_NO_BUILD=1: using the binaries already in $CARGO_TARGET_DIR/release"
else
    log "building moat (release) and the loadgen and tls_sink examples"
    (cd "$ROOT" && cargo build --release --quiet \
        && cargo build --release --quiet --example loadgen --example tls_sink) \
        || die "build failed (BENCH_NO_BUILD=1 runs the binaries already built)"
fi
[[ -x $MOAT_BIN && -x $LOADGEN && -x $SINK_BIN ]] || die "missing $MOAT_BIN, $LOADGEN or $SINK_BIN"

# ---------------------------------------------------------------- work dir and cleanup
WORK=$(mktemp -d /tmp/moat-bench.XXXXXX)
chmod 755 "$WORK"
PF=$WORK/postfix
MOAT_PID= IDLE_PID= PF_STARTED= SINK_PID= DSINK_PID=
cleanup() {
    local rc=$?
    set +e
    [[ -n $SINK_PID ]] && kill "$SINK_PID" 2>/dev/null && wait "$SINK_PID" 2>/dev/null
    [[ -n $DSINK_PID ]] && kill "$DSINK_PID" 2>/dev/null && wait "$DSINK_PID" 2>/dev/null
    [[ -n $IDLE_PID ]] && kill "$IDLE_PID" 2>/dev/null && wait "$IDLE_PID" 2>/dev/null
    if [[ -n $MOAT_PID ]]; then
        kill -TERM "$MOAT_PID" 2>/dev/null
        for _ in $(seq 100); do kill -0 "$MOAT_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$MOAT_PID" 2>/dev/null
        wait "$MOAT_PID" 2>/dev/null
    fi
    if [[ -n $PF_STARTED ]]; then
        local mpid
        mpid=$(cat "$PF/queue/pid/master.pid" 2>/dev/null | tr -d ' ')
        postfix -c "$PF/etc" stop >/dev/null 2>&1
        for _ in $(seq 100); do [[ -n $mpid ]] && kill -0 "$mpid" 2>/dev/null || break; sleep 0.1; done
    fi
    if [[ ${BENCH_KEEP:-0} == 1 || $rc != 0 ]]; then
        log "work dir kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

wait_port() { # ip port
    for _ in $(seq 300); do
        (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

# ---------------------------------------------------------------- Moat
mkdir -p "$WORK/moat"
cat >"$WORK/moat.toml" <<EOF
hostname = "moat.bench.test"
data_dir = "$WORK/moat"
worker_threads = $WORKERS

[[listener]]
name = "smtp"
address = "$MOAT_IP:$MOAT_PORT"
mode = "smtp"

[limits]
max_connections = 5000
max_connections_per_ip = 5000
# Idle connections for the memory measurement must not time out.
command_timeout_secs = 3600
session_timeout_secs = 7200
handshake_timeout_secs = 120
shutdown_grace_secs = 5

[[domain]]
name = "bench.test"
route = "discard"
EOF
MOAT_LOGFILE=$WORK/moat.log
MOAT_LOG=$MOAT_LOG_FILTER "$MOAT_BIN" serve -c "$WORK/moat.toml" >"$WORK/moat.out" 2>"$MOAT_LOGFILE" &
MOAT_PID=$!
wait_port $MOAT_IP $MOAT_PORT || { cat "$WORK/moat.out" "$MOAT_LOGFILE" >&2; die "Moat did not start"; }
log "Moat pid $MOAT_PID on $MOAT_IP:$MOAT_PORT ($("$MOAT_BIN" --version))"

# ---------------------------------------------------------------- Postfix
mkdir -p "$PF/etc" "$PF/queue" "$PF/data" "$PF/log"
chown postfix "$PF/data"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
    -subj /CN=pf.bench.test -keyout "$PF/etc/key.pem" -out "$PF/etc/cert.pem" 2>/dev/null
chmod 600 "$PF/etc/key.pem"
cat >"$PF/etc/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $PF/queue
data_directory = $PF/data
mail_owner = postfix
setgid_group = postdrop
myhostname = pf.bench.test
mydomain = bench.test
myorigin = \$myhostname
mydestination =
alias_maps =
alias_database =
local_recipient_maps =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.1/32
relay_domains = bench.test
relay_recipient_maps =
transport_maps = inline:{ bench.test=discard: }
maillog_file = $PF/log/maillog
maillog_file_prefixes = $PF/log
biff = no
# No throttling: the benchmark pushes from one client address.
default_process_limit = 200
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
smtpd_client_recipient_rate_limit = 0
smtpd_client_new_tls_session_rate_limit = 0
smtpd_client_auth_rate_limit = 0
in_flow_delay = 0s
# TLS, like Moat's listener: STARTTLS offered, self-signed ECDSA P-256 certificate.
smtpd_tls_security_level = may
smtpd_tls_chain_files = $PF/etc/key.pem, $PF/etc/cert.pem
smtpd_tls_loglevel = 0
smtpd_tls_received_header = yes
EOF
cat >"$PF/etc/master.cf" <<EOF
$PF_IP:smtp inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF
# Fatal errors only reach a tty: run under script(1) so they are seen.
script -qec "postfix -c $PF/etc check" /dev/null >"$WORK/pf-check.out" 2>&1 \
    || { cat "$WORK/pf-check.out" >&2; die "postfix check failed"; }
script -qec "postfix -c $PF/etc start" /dev/null >"$WORK/pf-start.out" 2>&1 \
    || { cat "$WORK/pf-start.out" >&2; die "postfix start failed"; }
PF_STARTED=1
wait_port $PF_IP $PF_PORT || { cat "$WORK/pf-start.out" "$PF/log/maillog" >&2; die "Postfix did not start"; }
PF_MASTER=$(tr -d ' ' <"$PF/queue/pid/master.pid")
log "Postfix $(postconf -c "$PF/etc" -h mail_version) master pid $PF_MASTER on $PF_IP:$PF_PORT"

# ---------------------------------------------------------------- the ceilings
SINK_STATE=$WORK/sink.state DSINK_STATE=$WORK/dsink.state
# The sinks' tokio runtime reads its thread count from TOKIO_WORKER_THREADS.
sink_env=()
((WORKERS > 0)) && sink_env=(env "TOKIO_WORKER_THREADS=$WORKERS")
"${sink_env[@]}" "$SINK_BIN" "$SINK_IP:$SINK_PORT" "$SINK_STATE" 2>"$WORK/sink.err" &
SINK_PID=$!
"${sink_env[@]}" "$SINK_BIN" "$DSINK_IP:$DSINK_PORT" "$DSINK_STATE" --sync "$WORK/dsink.ring" \
    2>"$WORK/dsink.err" &
DSINK_PID=$!
wait_port $SINK_IP $SINK_PORT || { cat "$WORK/sink.err" >&2; die "tls_sink did not start"; }
wait_port $DSINK_IP $DSINK_PORT || { cat "$WORK/dsink.err" >&2; die "tls_sink --sync did not start"; }
log "ceilings: tls_sink pid $SINK_PID on $SINK_IP:$SINK_PORT, tls_sink --sync pid $DSINK_PID on $DSINK_IP:$DSINK_PORT"

# ---------------------------------------------------------------- measuring helpers
CLK_TCK=$(getconf CLK_TCK)
# CPU ticks used so far by a process (utime+stime, + reaped children's when $2 = 1).
ticks_of() {
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    s=${s##*) }   # fields from 3 on
    read -r -a f <<<"$s"
    if [[ ${2:-0} == 1 ]]; then echo $((f[11] + f[12] + f[13] + f[14])); else echo $((f[11] + f[12])); fi
}
moat_ticks() { ticks_of "$MOAT_PID"; }
sink_ticks() { ticks_of "$SINK_PID"; }
dsink_ticks() { ticks_of "$DSINK_PID"; }
# Postfix: master with its reaped children, plus every live child.
pf_ticks() {
    local t c
    t=$(ticks_of "$PF_MASTER" 1)
    for c in $(pgrep -P "$PF_MASTER"); do t=$((t + $(ticks_of "$c"))); done
    echo "$t"
}
# Messages in Moat's queue, from the server itself (the journal holds many per file).
moat_queue() { "$MOAT_BIN" queue count -c "$WORK/moat.toml" 2>/dev/null || echo -1; }
sink_queue() { echo 0; }
dsink_queue() { echo 0; }
pf_queue() {
    find "$PF/queue/maildrop" "$PF/queue/incoming" "$PF/queue/active" "$PF/queue/deferred" \
        "$PF/queue/hold" -type f 2>/dev/null | wc -l
}
# Messages accepted (250 after DATA) and messages delivered (discarded), from each log.
moat_accepted() { grep -c ': accepted ' "$MOAT_LOGFILE" || true; }
moat_delivered() { grep -c 'discarded by route' "$MOAT_LOGFILE" || true; }
pf_accepted() { grep -c 'postfix/cleanup.*message-id=' "$PF/log/maillog" 2>/dev/null || true; }
pf_delivered() { grep -c 'postfix/discard.*status=sent' "$PF/log/maillog" 2>/dev/null || true; }
# The sinks count the messages they answered 250 (their state file, rewritten every 20 ms).
sink_accepted() { awk '{print $1}' "$SINK_STATE"; }
sink_delivered() { sink_accepted; }
dsink_accepted() { awk '{print $1}' "$DSINK_STATE"; }
dsink_delivered() { dsink_accepted; }

wait_drained() { # server
    local i
    for i in $(seq 600); do
        (($(${1}_queue) == 0)) && return 0
        sleep 0.1
    done
    return 1
}

addr_of() { # server -> "ip port"
    case $1 in
        moat) echo "$MOAT_IP $MOAT_PORT" ;;
        pf) echo "$PF_IP $PF_PORT" ;;
        sink) echo "$SINK_IP $SINK_PORT" ;;
        dsink) echo "$DSINK_IP $DSINK_PORT" ;;
    esac
}

# Runs one load against one server; prints "rate cpu_ms_per_msg client_cpu_s accepted delivered
# client_failures drained other_cpu_pct".
run_one() { # server path sessions
    local server=$1 path=$2 sess=$3 ip port out t0 t1 a0 d0 rate cfail csec secs
    read -r ip port < <(addr_of "$server")
    out=$WORK/run.$server.$path.$sess.$RANDOM
    a0=$(${server}_accepted) d0=$(${server}_delivered)
    t0=$(${server}_ticks) m0=$(machine_ticks)
    if [[ $path == plain ]]; then
        local TIMEFORMAT='%R %U %S' tm rc=0
        { time smtp-source -l "$SIZE" -m "$MESSAGES" -s "$sess" -f a@x.test -t b@bench.test \
            "$ip:$port" >"$out" 2>&1 || rc=$?; } 2>"$out.time"
        read -r secs u s <"$out.time"
        csec=$(echo "$u + $s" | bc)
        rate=$(echo "scale=1; $MESSAGES / $secs" | bc)
        cfail=0
        if ((rc != 0)) || [[ -s $out ]]; then
            cfail="rc=$rc"
            sed 's/^/    smtp-source: /' "$out" | head -5 >&2
        fi
    else
        local rc=0
        # shellcheck disable=SC2086
        "$LOADGEN" "$ip:$port" --starttls --per-message -n "$MESSAGES" -s "$SIZE" -c "$sess" \
            -f a@x.test -t b@bench.test $TLS_ARGS >"$out" 2>&1 || rc=$?
        local r
        r=$(grep '^RESULT' "$out") || { cat "$out" >&2; die "loadgen gave no result"; }
        rate=$(sed 's/.*rate=\([0-9.]*\).*/\1/' <<<"$r")
        csec=$(sed 's/.*cpu_secs=\([0-9.]*\).*/\1/' <<<"$r")
        cfail=$(sed 's/.*failed=\([0-9]*\).*/\1/' <<<"$r")
        secs=$(sed 's/.* secs=\([0-9.]*\).*/\1/' <<<"$r")
        ((rc == 0 && cfail == 0)) || grep '^loadgen: [0-9]* x' "$out" | head -5 | sed 's/^/    /' >&2
    fi
    t1=$(${server}_ticks) m1=$(machine_ticks)
    # CPU used by neither this server nor the client during the run (another build...), as a
    # share of the machine: anything well above a few % makes the run suspect.
    local other
    other=$(echo "scale=3; o = (($m1 - $m0) - ($t1 - $t0)) / $CLK_TCK - $csec; o = o * 100 / ($secs * $NCPU); scale=0; if (o < 0) o = 0; o / 1" | bc)
    local drained=yes
    wait_drained "$server" || drained="no($(${server}_queue) left)"
    sleep 0.5 # let the log writers catch up
    local acc=$(($(${server}_accepted) - a0)) del=$(($(${server}_delivered) - d0))
    local cpu_ms
    cpu_ms=$(echo "scale=2; ($t1 - $t0) * 1000 / $CLK_TCK / $MESSAGES" | bc)
    echo "$rate $cpu_ms $csec $acc $del $cfail $drained $other"
}

median() { sort -n | awk '{a[NR]=$1} END {if (NR % 2) print a[(NR+1)/2]; else printf "%.1f\n", (a[NR/2]+a[NR/2+1])/2}'; }

NCPU=$(nproc)
machine_ticks() { awk '/^cpu / {print $2+$3+$4+$7+$8+$9}' /proc/stat; } # all CPUs, busy
cpu_sample() { awk '/^cpu / {print $2+$3+$4+$7+$8+$9, $5+$6}' /proc/stat; } # busy idle
busy_pct() { # CPU busy % of the whole machine over one second (others' builds included)
    local b0 i0 b1 i1
    read -r b0 i0 < <(cpu_sample); sleep 1; read -r b1 i1 < <(cpu_sample)
    echo $(((b1 - b0) * 100 / (b1 - b0 + i1 - i0 + 1)))
}
wait_quiet() { # wait (up to 20 s) until the machine is mostly idle; print the last busy %
    local b
    for _ in $(seq 20); do
        b=$(busy_pct)
        ((b < 20)) && break
    done
    echo "$b"
}

# ---------------------------------------------------------------- warm-up
log "warm-up: 200 plain + 50 TLS messages to each server"
for s in pf moat sink dsink; do
    read -r ip port < <(addr_of "$s")
    smtp-source -l "$SIZE" -m 200 -s 10 -f a@x.test -t b@bench.test "$ip:$port" \
        || die "warm-up against $s failed"
    "$LOADGEN" "$ip:$port" --starttls --per-message -n 50 -c 5 -s "$SIZE" >/dev/null \
        || die "TLS warm-up against $s failed"
    wait_drained $s || log "warning: $s queue not drained after warm-up"
done

# ---------------------------------------------------------------- idle TLS memory (Moat)
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$MOAT_PID/status"; }
established() { ss -Htn state established "( sport = :$MOAT_PORT )" src $MOAT_IP | wc -l; }
IDLE_RESULT="skipped"
if ((IDLE > 0)); then
    log "idle: $IDLE TLS connections to Moat"
    sleep 1
    rss0=$(rss_kib)
    idle_out=$WORK/idle.out
    "$LOADGEN" "$MOAT_IP:$MOAT_PORT" --starttls --idle "$IDLE" -c 50 --hold-secs 600 \
        >"$idle_out" 2>&1 &
    IDLE_PID=$!
    for _ in $(seq 1200); do
        grep -q '^IDLE_READY' "$idle_out" && break
        kill -0 "$IDLE_PID" 2>/dev/null || break
        sleep 0.1
    done
    grep '^IDLE_READY' "$idle_out" >&2 || { cat "$idle_out" >&2; die "idle loadgen failed"; }
    sleep 2
    rss1=$(rss_kib) est=$(established)
    sleep 3
    rss1b=$(rss_kib) est2=$(established)
    up=$(sed -n 's/^IDLE_READY established=\([0-9]*\).*/\1/p' "$idle_out")
    kill -TERM "$IDLE_PID"
    wait "$IDLE_PID" || true
    IDLE_PID=
    grep '^IDLE_DONE' "$idle_out" >&2 || true
    sleep 1
    rss2=$(rss_kib)
    # A second round: if memory were leaked per connection, RSS would grow again.
    "$LOADGEN" "$MOAT_IP:$MOAT_PORT" --starttls --idle "$IDLE" -c 50 --hold-secs 2 >"$idle_out.2" 2>&1 \
        || log "warning: second idle round: $(grep -v '^IDLE' "$idle_out.2" | head -3)"
    sleep 1
    rss3=$(rss_kib)
    per=$(echo "scale=1; ($rss1b - $rss0) / $up" | bc)
    IDLE_RESULT="Moat VmRSS: ${rss0} KiB before, ${rss1} KiB -> ${rss1b} KiB with ${up} idle TLS connections (server-side established sockets: ${est}, 3 s later ${est2}), ${rss2} KiB after they closed, ${rss3} KiB after a second round of ${IDLE} => ${per} KiB per idle TLS connection"
    log "$IDLE_RESULT"
    grep -q ' x ' "$idle_out" && grep '^loadgen: [0-9]* x' "$idle_out" >&2
fi

# ---------------------------------------------------------------- large DATA memory
# Sessions inside a large DATA: what each costs the server (Pss, so Postfix's processes share
# their libraries once). Moat writes content past 1 MiB to the spool as it arrives.
LARGE_RESULT="skipped"
if ((LARGE_SESSIONS > 0)); then
    log "large: $LARGE_SESSIONS sessions each inside a DATA of $LARGE_SIZE octets"
    moat_large=$(python3 "$ROOT/scripts/large_data_rss.py" "$MOAT_IP:$MOAT_PORT" --pid "$MOAT_PID" \
        --sessions "$LARGE_SESSIONS" --size "$LARGE_SIZE") || die "large DATA against Moat failed"
    pf_large=$(python3 "$ROOT/scripts/large_data_rss.py" "$PF_IP:$PF_PORT" --pid "$PF_MASTER" --children \
        --sessions "$LARGE_SESSIONS" --size "$LARGE_SIZE") || die "large DATA against Postfix failed"
    per() { sed -n 's/.*per_session_kib=\([0-9-]*\).*/\1/p' <<<"$1"; }
    LARGE_RESULT="Pss per session inside a DATA of $((LARGE_SIZE >> 20)) MiB ($LARGE_SESSIONS sessions): Moat $(per "$moat_large") KiB, Postfix $(per "$pf_large") KiB (Moat: $moat_large; Postfix: $pf_large)"
    log "$LARGE_RESULT"
    wait_drained moat || log "warning: Moat queue not drained after the large messages"
    wait_drained pf || log "warning: Postfix queue not drained after the large messages"
fi

# ---------------------------------------------------------------- throughput
declare -A RATE CPU NOTE
problems=()
order=(pf moat)
for path in $PATHS; do
    for sess in $SESSIONS; do
        for ((r = 1; r <= REPEAT; r++)); do
            for server in "${order[@]}" sink dsink; do
                busy=$(wait_quiet)
                load="busy ${busy}%, loadavg $(cut -d' ' -f1 /proc/loadavg)"
                read -r rate cpu csec acc del cfail drained other < <(run_one "$server" "$path" "$sess")
                log "$path sessions=$sess $server: $rate msg/s, server CPU $cpu ms/msg, client CPU ${csec}s, accepted $acc delivered $del, client failures $cfail, drained $drained (before: $load; other CPU during the run: ${other}%)"
                RATE[$server.$path.$sess]+="$rate "
                CPU[$server.$path.$sess]+="$cpu "
                case $server in moat) name=Moat ;; pf) name=Postfix ;; *) name=$server ;; esac
                NOTE[$path.$sess]+="$name ${other}%, "
                if [[ $acc != "$MESSAGES" || $del != "$MESSAGES" || $cfail != 0 || $drained != yes ]]; then
                    problems+=("$path sessions=$sess $server run $r: accepted $acc, delivered $del of $MESSAGES, client failures $cfail, drained $drained")
                fi
            done
            order=("${order[1]}" "${order[0]}") # alternate who goes first
        done
    done
done

# ---------------------------------------------------------------- report
med() { tr ' ' '\n' <<<"$1" | grep . | median; }
echo
echo "Moat vs Postfix: $MESSAGES messages of $SIZE bytes per cell, median of $REPEAT run(s); $(nproc) cores; $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "plain = smtp-source, one connection per message (no -d); tls = loadgen STARTTLS, one connection + full handshake per message"
echo "worker threads of Moat and the sinks: $( ((WORKERS > 0)) && echo "$WORKERS" || echo "one per core (default)")"
echo
echo "| path | sessions | Postfix msg/s | Moat msg/s | ratio Moat/Postfix | 4x Postfix | ceiling: dsink (durable) / sink (keeps nothing) | 4x possible here? | Moat % of dsink | CPU ms/msg Postfix / Moat | CPU ratio Moat/Postfix (target <= 0.20) | other CPU during run |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
for path in $PATHS; do
    for sess in $SESSIONS; do
        p=$(med "${RATE[pf.$path.$sess]}") m=$(med "${RATE[moat.$path.$sess]}")
        d=$(med "${RATE[dsink.$path.$sess]}") k=$(med "${RATE[sink.$path.$sess]}")
        pc=$(med "${CPU[pf.$path.$sess]}") mc=$(med "${CPU[moat.$path.$sess]}")
        ratio=$(echo "scale=2; $m / $p" | bc)
        four=$(echo "scale=1; 4 * $p" | bc)
        share=$(echo "scale=0; 100 * $m / $d" | bc)
        cpu_ratio=$(echo "scale=2; $mc / $pc" | bc)
        if (($(echo "$four <= $d" | bc))); then
            possible="yes"
        elif (($(echo "$four <= $k" | bc))); then
            possible="no durable server (above dsink)"
        else
            possible="no server at all (above sink)"
        fi
        echo "| $path | $sess | $p | $m | $ratio | $four | $d / $k | $possible | $share% | $pc / $mc | $cpu_ratio | ${NOTE[$path.$sess]%, } |"
    done
done
echo
echo "Idle: $IDLE_RESULT"
echo "Large DATA: $LARGE_RESULT"
echo "ceilings = examples/tls_sink.rs under the same load: dsink writes and syncs each message (group commit) and nothing else, sink keeps nothing"
echo "other CPU during run = machine CPU used by neither that server nor its load client, in % of $NCPU cores (a few % is the kernel: writeback, journal)"
echo "uptime now: $(uptime)"
errs=$(grep -cE ' (WARN|ERROR) ' "$MOAT_LOGFILE" || true)
echo "Moat log: $(moat_accepted) accepted, $(moat_delivered) discarded, $errs WARN/ERROR lines"
if ((errs > 0)); then grep -E ' (WARN|ERROR) ' "$MOAT_LOGFILE" | sed 's/^.*Z //' | cut -c1-160 | sort | uniq -c | sort -rn | head -10; fi
pferrs=$(grep -cE 'warning|fatal|panic|error' "$PF/log/maillog" || true)
echo "Postfix log: $(pf_accepted) queued, $(pf_delivered) discarded, $pferrs warning/error lines"
if ((pferrs > 0)); then grep -E 'warning|fatal|panic|error' "$PF/log/maillog" | cut -d' ' -f5- | cut -c1-160 | sort | uniq -c | sort -rn | head -10; fi
if ((${#problems[@]})); then
    echo "PROBLEMS:"
    printf '  %s\n' "${problems[@]}"
    exit 2
fi
echo "All runs: every message accepted and delivered, queues drained, no client failures."
