#!/usr/bin/env bash
# RELAY benchmark: Moat vs Postfix, each relaying to the same receivers, side by side in one
# run. A benchmark, not a test. (scripts/bench.sh measures accepting mail; this one measures
# accept + queue + deliver to a next hop, end to end.)
#
#   scripts/bench-relay.sh                       # full run: 10,000 messages of 4 KiB per cell
#   BENCH_MESSAGES=1000 scripts/bench-relay.sh   # quick run
#
# Environment:
#   BENCH_MESSAGES    messages per cell (10000)      BENCH_SIZE       body bytes (4096)
#   BENCH_SESSIONS    injection sessions ("10")
#   BENCH_CASES       "sink tls tlsreuse tlssink tlssinkreuse"
#   BENCH_REPEAT      runs per cell, median kept (1; odd numbers: 3 for a report)
#   BENCH_CONCURRENCY parallel deliveries per relay, both servers (20): Moat [queue]
#                     max_concurrent_deliveries and max_per_destination (default 10), Postfix
#                     default_destination_concurrency_limit (also its default, 20)
#   BENCH_STALL       seconds without a new delivery before a run is declared stuck (60)
#   BENCH_MOAT_LOG    Moat's MOAT_LOG filter (info)  BENCH_KEEP=1     keep the work dir
#   BENCH_NO_BUILD=1  skip cargo build and run the release binary already there
#
# What runs (all on loopback, nothing else is touched):
#   Moat relay     release build, 127.0.0.50:2525; [relay] trusted_networks = 127.0.0.0/8;
#                  `relay.test` route = "relay" to the sink, `tls.relay.test` and
#                  `tlsreuse.relay.test` route = "relay" to the TLS receiver, with a
#                  [[tls_policy]] level = "may" (the default, spelled out). [queue]
#                  max_concurrent_deliveries = max_per_destination = BENCH_CONCURRENCY.
#                  Since d0452a2 Moat keeps a session open up to 3 s after a transaction (at
#                  most 8 idle per destination) and sends the next message to the same
#                  destination on it, TLS sessions included; before that it opened one
#                  connection (and did one full TLS handshake) per message. Its client never
#                  resumes TLS sessions. The "msgs per connection" column shows what happened.
#   Postfix relay  its own config dir, 127.0.0.51:25; relay_domains = the three domains;
#                  transport_maps to smtp:[127.0.0.40]:2600 (sink) and [127.0.0.41]:25 (TLS);
#                  smtp_tls_security_level = may (so both relays use opportunistic TLS);
#                  default_destination_concurrency_limit = BENCH_CONCURRENCY (Postfix's own
#                  slow start from initial_destination_concurrency = 5 is left as is).
#                  Postfix defaults otherwise: it reuses PLAINTEXT connections when a
#                  destination has a backlog (smtp_connection_cache_on_demand = yes), but not
#                  TLS ones (smtp_tls_connection_reuse = no), and keeps no TLS session cache.
#                  Case `tlsreuse` sends through a second transport with
#                  `-o smtp_tls_connection_reuse=yes` (TLS connections cached via tlsproxy).
#   Receivers      sink: `smtp-sink -c 127.0.0.40:2600` (plaintext, no STARTTLS; counts "."s
#                        and sessions).
#                  tls, tlsreuse: a second Postfix on 127.0.0.41:25, STARTTLS offered with a
#                        self-signed ECDSA P-256 certificate, both domains to `discard:` (each
#                        message is queued with fsync, then discarded). Counted from its log:
#                        `discard ... status=sent`, `connect from`, `TLS connection established`.
#                  tlssink, tlssinkreuse: `examples/tls_sink.rs` on 127.0.0.42:2601, smtp-sink
#                        with STARTTLS (self-signed ECDSA P-256; accepts, keeps nothing, counts
#                        messages, connections and handshakes). With it the relay, not the
#                        receiver, is what is measured over TLS (the receiving Postfix above
#                        spends 2.5-5 ms of CPU per message on the same 2 cores). Postfix relays
#                        through `smtp` (tlssink) or `smtpreuse` (tlssinkreuse), as above.
#   Load           `smtp-source -l SIZE -m N -s SESS -f a@x.test -t b@DOMAIN RELAY` (plaintext
#                  injection, one connection per message, same for both relays).
#   Rate = messages counted AT THE RECEIVER / time from the start of injection to the moment
#   the last one is counted (polled every 50 ms). Each relay's queue must then be empty, and
#   every message must show as accepted and relayed in the relay's log, with no deferral.
#   For each cell the two relays run back to back (order alternates), after the receiver's
#   connections from the previous run have closed. Everything (client, relays, receivers)
#   shares the same 2 cores: compare the ratios, not absolute numbers.
set -euo pipefail

MESSAGES=${BENCH_MESSAGES:-10000}
SIZE=${BENCH_SIZE:-4096}
SESSIONS=${BENCH_SESSIONS:-"10"}
CASES=${BENCH_CASES:-"sink tls tlsreuse tlssink tlssinkreuse"}
REPEAT=${BENCH_REPEAT:-1}
CONC=${BENCH_CONCURRENCY:-20}
STALL=${BENCH_STALL:-60}
MOAT_LOG_FILTER=${BENCH_MOAT_LOG:-info}
MOAT_IP=127.0.0.50 MOAT_PORT=2525 # Moat relay
PF_IP=127.0.0.51 PF_PORT=25       # Postfix relay
SINK_IP=127.0.0.40 SINK_PORT=2600 # smtp-sink (plaintext)
RCV_IP=127.0.0.41 RCV_PORT=25     # Postfix receiver (STARTTLS, discard)
TSINK_IP=127.0.0.42 TSINK_PORT=2601 # tls_sink (STARTTLS, keeps nothing)

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
MOAT_BIN=$CARGO_TARGET_DIR/release/moat
TSINK_BIN=$CARGO_TARGET_DIR/release/examples/tls_sink

log() { printf '[bench-relay %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- install what is missing
need=()
command -v smtp-source >/dev/null && command -v smtp-sink >/dev/null && command -v postfix >/dev/null || need+=(postfix)
command -v pgrep >/dev/null && command -v uptime >/dev/null || need+=(procps)
command -v openssl >/dev/null || need+=(openssl)
command -v script >/dev/null || need+=(bsdutils)
command -v bc >/dev/null || need+=(bc)
command -v ss >/dev/null || need+=(iproute2)
command -v perl >/dev/null || need+=(perl-base)
if ((${#need[@]})); then
    log "installing ${need[*]}"
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
[[ -n ${EPOCHREALTIME:-} ]] || die "bash 5 needed (EPOCHREALTIME)"

# ---------------------------------------------------------------- build
if [[ ${BENCH_NO_BUILD:-0} == 1 ]]; then
    log "BENCH_NO_BUILD=1: using the binary already in $CARGO_TARGET_DIR/release"
else
    command -v cargo >/dev/null || die "cargo not found"
    log "building moat and the tls_sink example (release)"
    (cd "$ROOT" && cargo build --release --quiet && cargo build --release --quiet --example tls_sink) \
        || die "build failed (BENCH_NO_BUILD=1 runs the binary already built)"
fi
[[ -x $MOAT_BIN && -x $TSINK_BIN ]] || die "missing $MOAT_BIN or $TSINK_BIN"

# ---------------------------------------------------------------- work dir and cleanup
WORK=$(mktemp -d /tmp/moat-bench-relay.XXXXXX)
chmod 755 "$WORK"
PF=$WORK/postfix-relay
RCV=$WORK/postfix-receiver
MOAT_PID='' SINK_PID='' TSINK_PID='' TAIL_PID='' PF_STARTED='' RCV_STARTED=''
pf_stop() { # config-root
    local mpid
    mpid=$(cat "$1/queue/pid/master.pid" 2>/dev/null | tr -d ' ')
    postfix -c "$1/etc" stop >/dev/null 2>&1
    for _ in $(seq 100); do [[ -n $mpid ]] && kill -0 "$mpid" 2>/dev/null || break; sleep 0.1; done
}
cleanup() {
    local rc=$?
    set +e
    if [[ -n $MOAT_PID ]]; then
        kill -TERM "$MOAT_PID" 2>/dev/null
        for _ in $(seq 100); do kill -0 "$MOAT_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$MOAT_PID" 2>/dev/null
        wait "$MOAT_PID" 2>/dev/null
    fi
    [[ -n $PF_STARTED ]] && pf_stop "$PF"
    [[ -n $RCV_STARTED ]] && pf_stop "$RCV"
    [[ -n $SINK_PID ]] && kill "$SINK_PID" 2>/dev/null && wait "$SINK_PID" 2>/dev/null
    [[ -n $TSINK_PID ]] && kill "$TSINK_PID" 2>/dev/null && wait "$TSINK_PID" 2>/dev/null
    [[ -n $TAIL_PID ]] && kill "$TAIL_PID" 2>/dev/null && wait "$TAIL_PID" 2>/dev/null
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

wait_port() { # ip port [pid that must stay alive]
    for _ in $(seq 300); do
        (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0
        [[ -z ${3:-} ]] || kill -0 "$3" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# Receivers are counted WITHOUT forking in the polling loop (a fork per poll would cost the
# run several % of the machine): a perl filter reads the receiver's output in chunks and
# after each chunk overwrites "messages connections tls" (fixed width, one pwrite) in a state
# file that the loop reads with `read`. About 0.01 ms of CPU per message.
# shellcheck disable=SC2016
COUNTER_PL='
    my ($mode, $f) = @ARGV;
    open(my $o, "+>", $f) or die "$f: $!";
    my ($buf, $m, $c, $t) = ("", 0, 0, 0);
    my $put = sub { sysseek($o, 0, 0); syswrite($o, sprintf("%-12d %-12d %-12d\n", $m, $c, $t)) };
    $put->();
    while (sysread(STDIN, $buf, 65536, length $buf)) {
        if ($mode eq "sink") {      # "sess=N quit=N mesg=N\r" after every change
            my $i = rindex($buf, "\r");
            next if $i < 0;
            my $chunk = substr($buf, 0, $i + 1, "");
            my ($last) = $chunk =~ /sess=(\d+) quit=\d+ mesg=(\d+)\r$/ or next;
            ($c, $m) = ($1, $2);
        } else {                    # the receiver Postfix maillog
            my $i = rindex($buf, "\n");
            next if $i < 0;
            my $chunk = substr($buf, 0, $i + 1, "");
            $m += () = $chunk =~ m{postfix/discard\[[^\n]*status=sent}g;
            $c += () = $chunk =~ m{postfix/smtpd\[[^\n]*: connect from }g;
            $t += () = $chunk =~ m{TLS connection established from }g;
        }
        $put->();
    }'
# ---------------------------------------------------------------- receiver 1: smtp-sink
# -c prints "sess=N quit=N mesg=N" counters (separated by \r) each time one changes.
SINK_STATE=$WORK/sink.state
smtp-sink -c -u nobody -h sink.bench.test "$SINK_IP:$SINK_PORT" 1000 2>"$WORK/sink.err" \
    > >(exec perl -e "$COUNTER_PL" sink "$SINK_STATE") &
SINK_PID=$!
wait_port $SINK_IP $SINK_PORT "$SINK_PID" || { cat "$WORK/sink.err" >&2; die "smtp-sink did not start"; }
log "smtp-sink pid $SINK_PID on $SINK_IP:$SINK_PORT"

# ---------------------------------------------------------------- receiver 3: tls_sink
# Writes "messages connections tls" to its state file itself, every 20 ms.
TSINK_STATE=$WORK/tsink.state
"$TSINK_BIN" "$TSINK_IP:$TSINK_PORT" "$TSINK_STATE" 2>"$WORK/tsink.err" &
TSINK_PID=$!
wait_port $TSINK_IP $TSINK_PORT "$TSINK_PID" || { cat "$WORK/tsink.err" >&2; die "tls_sink did not start"; }
log "tls_sink pid $TSINK_PID on $TSINK_IP:$TSINK_PORT"

# ---------------------------------------------------------------- Postfix instances
# Writes DIR/etc/{main,master}.cf shared by both instances: no aliases, no local delivery, no
# throttling, no chroot, log to DIR/log/maillog. $3 is appended to main.cf.
pf_make() { # dir listen-ip extra-main.cf
    local d=$1
    mkdir -p "$d/etc" "$d/queue" "$d/data" "$d/log"
    chown postfix "$d/data"
    cat >"$d/etc/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $d/queue
data_directory = $d/data
mail_owner = postfix
setgid_group = postdrop
mydestination =
alias_maps =
alias_database =
local_recipient_maps =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_recipient_maps =
maillog_file = $d/log/maillog
maillog_file_prefixes = $d/log
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
# A failure is retried soon (and reported), not after the default 5 minutes.
queue_run_delay = 2s
minimal_backoff_time = 2s
maximal_backoff_time = 10s
$3
EOF
    cat >"$d/etc/master.cf" <<EOF
$2:smtp inet  n       -       n       -       -       smtpd
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
smtpreuse unix  -       -       n       -       -       smtp -o smtp_tls_connection_reuse=yes
tlsproxy  unix  -       -       n       -       0       tlsproxy
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF
}
pf_start() { # dir ip port name
    # Fatal errors only reach a tty: run under script(1) so they are seen.
    script -qec "postfix -c $1/etc check" /dev/null >"$1/check.out" 2>&1 \
        || { cat "$1/check.out" >&2; die "postfix check failed ($4)"; }
    script -qec "postfix -c $1/etc start" /dev/null >"$1/start.out" 2>&1 \
        || { cat "$1/start.out" >&2; die "postfix start failed ($4)"; }
}

# Receiver 2: Postfix with STARTTLS that queues (fsync) and discards.
pf_make "$RCV" "$RCV_IP" "myhostname = receiver.bench.test
mydomain = bench.test
relay_domains = tls.relay.test, tlsreuse.relay.test
transport_maps = inline:{ tls.relay.test=discard:, tlsreuse.relay.test=discard: }
smtpd_tls_security_level = may
smtpd_tls_chain_files = $RCV/etc/key.pem, $RCV/etc/cert.pem
smtpd_tls_loglevel = 1
smtpd_tls_received_header = yes"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
    -subj /CN=receiver.bench.test -keyout "$RCV/etc/key.pem" -out "$RCV/etc/cert.pem" 2>/dev/null
chmod 600 "$RCV/etc/key.pem"
pf_start "$RCV" $RCV_IP $RCV_PORT receiver
RCV_STARTED=1
wait_port $RCV_IP $RCV_PORT || { cat "$RCV/start.out" "$RCV/log/maillog" >&2; die "receiver Postfix did not start"; }
RCV_MASTER=$(tr -d ' ' <"$RCV/queue/pid/master.pid")
# Its log, followed: messages discarded, SMTP connections, TLS sessions.
RCV_STATE=$WORK/receiver.state
tail -n +1 -F "$RCV/log/maillog" 2>/dev/null > >(exec perl -e "$COUNTER_PL" postfix "$RCV_STATE") &
TAIL_PID=$!
log "receiver Postfix master pid $RCV_MASTER on $RCV_IP:$RCV_PORT (STARTTLS, discard)"

# The Postfix relay.
pf_make "$PF" "$PF_IP" "myhostname = pf-relay.bench.test
mydomain = bench.test
relay_domains = relay.test, tls.relay.test, tlsreuse.relay.test, tlssink.relay.test, tlssinkreuse.relay.test
transport_maps = inline:{ relay.test=smtp:[$SINK_IP]:$SINK_PORT, tls.relay.test=smtp:[$RCV_IP]:$RCV_PORT,
    tlsreuse.relay.test=smtpreuse:[$RCV_IP]:$RCV_PORT, tlssink.relay.test=smtp:[$TSINK_IP]:$TSINK_PORT,
    tlssinkreuse.relay.test=smtpreuse:[$TSINK_IP]:$TSINK_PORT }
default_destination_concurrency_limit = $CONC
smtp_tls_security_level = may
smtp_tls_loglevel = 1"
pf_start "$PF" $PF_IP $PF_PORT relay
PF_STARTED=1
wait_port $PF_IP $PF_PORT || { cat "$PF/start.out" "$PF/log/maillog" >&2; die "Postfix relay did not start"; }
PF_MASTER=$(tr -d ' ' <"$PF/queue/pid/master.pid")
log "Postfix $(postconf -c "$PF/etc" -h mail_version) relay master pid $PF_MASTER on $PF_IP:$PF_PORT"

# ---------------------------------------------------------------- Moat relay
mkdir -p "$WORK/moat"
cat >"$WORK/moat.toml" <<EOF
hostname = "moat-relay.bench.test"
data_dir = "$WORK/moat"

[[listener]]
name = "smtp"
address = "$MOAT_IP:$MOAT_PORT"
mode = "smtp"

[limits]
max_connections = 5000
max_connections_per_ip = 5000
shutdown_grace_secs = 5

[relay]
trusted_networks = ["127.0.0.0/8"]

[[domain]]
name = "relay.test"
route = "relay"
relay = "$SINK_IP:$SINK_PORT"

[[domain]]
name = "tls.relay.test"
route = "relay"
relay = "$RCV_IP:$RCV_PORT"

[[domain]]
name = "tlsreuse.relay.test"
route = "relay"
relay = "$RCV_IP:$RCV_PORT"

[[domain]]
name = "tlssink.relay.test"
route = "relay"
relay = "$TSINK_IP:$TSINK_PORT"

[[domain]]
name = "tlssinkreuse.relay.test"
route = "relay"
relay = "$TSINK_IP:$TSINK_PORT"

# The default for every domain; spelled out: STARTTLS when offered, any certificate.
[[tls_policy]]
domains = ["relay.test", "tls.relay.test", "tlsreuse.relay.test", "tlssink.relay.test", "tlssinkreuse.relay.test"]
level = "may"

[queue]
max_concurrent_deliveries = $CONC
max_per_destination = $CONC
# A failure is retried soon (and reported), not after the default 60 s.
retry_schedule_secs = [2, 5, 10]

[outbound]
connect_timeout_secs = 10
EOF
MOAT_LOGFILE=$WORK/moat.log
MOAT_LOG=$MOAT_LOG_FILTER "$MOAT_BIN" serve -c "$WORK/moat.toml" >"$WORK/moat.out" 2>"$MOAT_LOGFILE" &
MOAT_PID=$!
wait_port $MOAT_IP $MOAT_PORT "$MOAT_PID" || { cat "$WORK/moat.out" "$MOAT_LOGFILE" >&2; die "Moat did not start"; }
MOAT_REV=$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)
log "Moat pid $MOAT_PID on $MOAT_IP:$MOAT_PORT ($("$MOAT_BIN" --version), source $MOAT_REV), $CONC parallel deliveries"

# ---------------------------------------------------------------- measuring helpers
CLK_TCK=$(getconf CLK_TCK)
NCPU=$(nproc)
# CPU ticks used so far by a process (utime+stime, + reaped children's when $2 = 1).
ticks_of() {
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    s=${s##*) }   # fields from 3 on
    read -r -a f <<<"$s"
    if [[ ${2:-0} == 1 ]]; then echo $((f[11] + f[12] + f[13] + f[14])); else echo $((f[11] + f[12])); fi
}
# A Postfix instance: master with its reaped children, plus every live child.
pf_tree_ticks() { # master-pid
    local t c
    t=$(ticks_of "$1" 1)
    for c in $(pgrep -P "$1"); do t=$((t + $(ticks_of "$c"))); done
    echo "$t"
}
moat_ticks() { ticks_of "$MOAT_PID"; }
pf_ticks() { pf_tree_ticks "$PF_MASTER"; }
sink_ticks() { ticks_of "$SINK_PID"; }
tsink_ticks() { ticks_of "$TSINK_PID"; }
tls_ticks() { pf_tree_ticks "$RCV_MASTER"; }
machine_ticks() { awk '/^cpu / {print $2+$3+$4+$7+$8+$9}' /proc/stat; } # all CPUs, busy

# Messages in Moat's queue, from the server itself (the journal holds many per file).
moat_queue() { "$MOAT_BIN" queue count -c "$WORK/moat.toml" 2>/dev/null || echo -1; }
pf_queue() {
    find "$PF/queue/maildrop" "$PF/queue/incoming" "$PF/queue/active" "$PF/queue/deferred" \
        "$PF/queue/hold" -type f 2>/dev/null | wc -l
}
rcv_queue() {
    find "$RCV/queue/maildrop" "$RCV/queue/incoming" "$RCV/queue/active" "$RCV/queue/deferred" \
        "$RCV/queue/hold" -type f 2>/dev/null | wc -l
}
# Relay side, from each relay's log: accepted (250 after DATA), delivered to a receiver (its
# address in $1), not delivered (deferrals/bounces).
moat_accepted() { grep -c ': accepted ' "$MOAT_LOGFILE" || true; }
moat_delivered() { grep -F ': delivered ' "$MOAT_LOGFILE" | grep -cF "relay=$1 " || true; }
moat_failed() { grep -c 'not delivered' "$MOAT_LOGFILE" || true; }
pf_accepted() { grep -c 'postfix/cleanup.*message-id=' "$PF/log/maillog" || true; }
pf_delivered() { grep 'postfix/smtp\[.*status=sent' "$PF/log/maillog" | grep -cF "relay=$1[$1]" || true; }
pf_failed() { grep -cE 'postfix/smtp\[.*status=(deferred|bounced)' "$PF/log/maillog" || true; }

# Receiver side, from the state files (no fork): sets RECV_MSGS RECV_CONNS RECV_TLS.
RECV_MSGS=0 RECV_CONNS=0 RECV_TLS=0
recv_read() { # case
    local a='' b='' c='' file=$RCV_STATE
    [[ $1 == sink ]] && file=$SINK_STATE
    [[ $1 == tlssink* ]] && file=$TSINK_STATE
    read -r a b c <"$file" 2>/dev/null || true
    # A read racing the writer could see a torn line: skip anything odd (the next poll is 50 ms
    # away), and callers confirm a final count with a second read.
    [[ $a =~ ^[0-9]+$ && $b =~ ^[0-9]+$ && $c =~ ^[0-9]+$ ]] || return 0
    RECV_MSGS=$a RECV_CONNS=$b RECV_TLS=$c
}
# Connections still open to a receiver (Postfix keeps idle plaintext connections ~2 s).
receiver_conns() { # ip port
    ss -Htn state established "( dport = :$2 )" dst "$1" | wc -l
}
wait_receiver_idle() { # case, up to 20 s
    local ip port
    case $1 in
    sink) ip=$SINK_IP port=$SINK_PORT ;;
    tlssink*) ip=$TSINK_IP port=$TSINK_PORT ;;
    *) ip=$RCV_IP port=$RCV_PORT ;;
    esac
    for _ in $(seq 200); do
        (($(receiver_conns "$ip" "$port") == 0)) && return 0
        sleep 0.1
    done
    return 1
}
exec {SLEEP_FD}<> <(:) # read -t on a pipe nobody writes: a sleep without a fork

wait_drained() { # server (moat|pf|rcv), up to 60 s
    for _ in $(seq 600); do
        (($(${1}_queue) == 0)) && return 0
        sleep 0.1
    done
    return 1
}

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
relay_addr() { if [[ $1 == moat ]]; then echo "$MOAT_IP:$MOAT_PORT"; else echo "$PF_IP:$PF_PORT"; fi; }
domain_of_case() { case $1 in sink) echo relay.test ;; *) echo "$1.relay.test" ;; esac; }
receiver_ip() { case $1 in sink) echo "$SINK_IP" ;; tlssink*) echo "$TSINK_IP" ;; *) echo "$RCV_IP" ;; esac; }
receiver_ticks() { case $1 in sink) sink_ticks ;; tlssink*) tsink_ticks ;; *) tls_ticks ;; esac; }

# Runs one load through one relay to one receiver. Sets R_* globals.
run_one() { # server case sessions count
    local server=$1 case=$2 sess=$3 n=$4 out ip dom rc=0
    ip=$(receiver_ip "$case") dom=$(domain_of_case "$case")
    out=$WORK/run.$server.$case.$sess.$RANDOM
    wait_receiver_idle "$case" || log "warning: connections to the $case receiver still open"
    sleep 0.3
    recv_read "$case"
    local r0=$RECV_MSGS c0=$RECV_CONNS s0=$RECV_TLS
    local a0 d0 f0 t0 rt0 m0 start inj_end end
    a0=$(${server}_accepted) d0=$(${server}_delivered "$ip") f0=$(${server}_failed)
    t0=$(${server}_ticks) rt0=$(receiver_ticks "$case") m0=$(machine_ticks)
    local TIMEFORMAT='%U %S' csec u s
    start=$EPOCHREALTIME
    { time smtp-source -l "$SIZE" -m "$n" -s "$sess" -f a@x.test -t "b@$dom" \
        "$(relay_addr "$server")" >"$out" 2>&1 || rc=$?; } 2>"$out.time"
    inj_end=$EPOCHREALTIME
    read -r u s <"$out.time"
    csec=$(echo "$u + $s" | bc)
    R_CFAIL=0
    if ((rc != 0)) || [[ -s $out ]]; then
        R_CFAIL="rc=$rc"
        sed 's/^/    smtp-source: /' "$out" | head -5 >&2
    fi
    # Poll the receiver (every 50 ms, no fork) until all n arrived, or nothing new came for
    # $STALL seconds.
    local got=0 last=-1 last_change=$SECONDS
    R_STUCK=no
    while :; do
        recv_read "$case"
        got=$((RECV_MSGS - r0))
        if ((got >= n)); then
            end=$EPOCHREALTIME
            read -r -t 0.01 -u "$SLEEP_FD" || true
            recv_read "$case" # confirm (a torn read must not end the run early)
            (($(( RECV_MSGS - r0 )) >= n)) && break
        fi
        if ((got != last)); then last=$got last_change=$SECONDS; fi
        if ((SECONDS - last_change >= STALL)); then R_STUCK="yes(${got}/${n} after ${STALL}s without progress)"; break; fi
        read -r -t 0.05 -u "$SLEEP_FD" || true
    done
    [[ $R_STUCK == no ]] || end=$EPOCHREALTIME
    local t1 rt1 m1
    t1=$(${server}_ticks) rt1=$(receiver_ticks "$case") m1=$(machine_ticks)
    R_DRAINED=yes
    wait_drained "$server" || R_DRAINED="no($(${server}_queue) left)"
    [[ $case == tls || $case == tlsreuse ]] && { wait_drained rcv || R_DRAINED+=",receiver($(rcv_queue) left)"; }
    wait_receiver_idle "$case" || true # so cached connections are counted as ended
    sleep 0.5                           # let the log writers catch up
    recv_read "$case"
    local secs inj_secs
    secs=$(echo "$end - $start" | bc) inj_secs=$(echo "$inj_end - $start" | bc)
    R_RECEIVED=$((RECV_MSGS - r0)) R_CONNS=$((RECV_CONNS - c0)) R_TLS=$((RECV_TLS - s0))
    R_ACC=$(($(${server}_accepted) - a0))
    R_DEL=$(($(${server}_delivered "$ip") - d0))
    R_FAIL=$(($(${server}_failed) - f0))
    R_RATE=$(echo "scale=1; $got / $secs" | bc)
    R_INJ=$(echo "scale=1; $n / $inj_secs" | bc)
    R_SECS=$(printf '%.2f' "$secs")
    R_CPU=$(echo "scale=2; ($t1 - $t0) * 1000 / $CLK_TCK / $n" | bc)
    R_RCPU=$(echo "scale=2; ($rt1 - $rt0) * 1000 / $CLK_TCK / $n" | bc)
    R_PERCONN=-
    ((R_CONNS > 0)) && R_PERCONN=$(echo "scale=1; $R_RECEIVED / $R_CONNS" | bc)
    # CPU used by neither the relay, the receiver nor the client during the run (another
    # build...), as a share of the machine: anything well above a few % makes the run suspect.
    R_OTHER=$(echo "scale=3; o = (($m1 - $m0) - ($t1 - $t0) - ($rt1 - $rt0)) / $CLK_TCK - $csec; o = o * 100 / ($secs * $NCPU); scale=0; if (o < 0) o = 0; o / 1" | bc)
    R_CSEC=$csec
}

median() { sort -n | awk '{a[NR]=$1} END {if (NR % 2) print a[(NR+1)/2]; else printf "%.2f\n", (a[NR/2]+a[NR/2+1])/2}'; }

# ---------------------------------------------------------------- warm-up
log "warm-up: 200 messages through each relay to each receiver"
for case in $CASES; do
    for s in pf moat; do
        run_one "$s" "$case" 10 200
        [[ $R_STUCK == no && $R_RECEIVED == 200 ]] \
            || die "warm-up $case via $s: received $R_RECEIVED of 200, stuck $R_STUCK (logs in $WORK)"
    done
done

# ---------------------------------------------------------------- throughput
UPTIME_START=$(uptime)
declare -A RATE CPU RCPU INJ PERCONN OTHER
problems=()
order=(pf moat)
for case in $CASES; do
    for sess in $SESSIONS; do
        for ((r = 1; r <= REPEAT; r++)); do
            for server in "${order[@]}"; do
                busy=$(wait_quiet)
                load="busy ${busy}%, loadavg $(cut -d' ' -f1 /proc/loadavg)"
                run_one "$server" "$case" "$sess" "$MESSAGES"
                log "$case sessions=$sess $server: $R_RATE msg/s end to end (${R_SECS}s; injection $R_INJ msg/s), relay CPU $R_CPU ms/msg, receiver CPU $R_RCPU ms/msg, client CPU ${R_CSEC}s; relay accepted $R_ACC delivered $R_DEL not-delivered-events $R_FAIL; receiver got $R_RECEIVED over $R_CONNS connections ($R_TLS TLS); client failures $R_CFAIL; stuck $R_STUCK; drained $R_DRAINED (before: $load; other CPU during the run: ${R_OTHER}%)"
                RATE[$server.$case.$sess]+="$R_RATE "
                CPU[$server.$case.$sess]+="$R_CPU "
                RCPU[$server.$case.$sess]+="$R_RCPU "
                INJ[$server.$case.$sess]+="$R_INJ "
                PERCONN[$server.$case.$sess]+="$R_PERCONN "
                OTHER[$server.$case.$sess]+="$R_OTHER "
                if [[ $R_ACC != "$MESSAGES" || $R_DEL != "$MESSAGES" || $R_RECEIVED != "$MESSAGES" || $R_FAIL != 0 \
                    || $R_CFAIL != 0 || $R_STUCK != no || $R_DRAINED != yes ]]; then
                    problems+=("$case sessions=$sess $server run $r: accepted $R_ACC, relayed $R_DEL, received $R_RECEIVED of $MESSAGES, not-delivered events $R_FAIL, client failures $R_CFAIL, stuck $R_STUCK, drained $R_DRAINED")
                fi
                if [[ $case != sink && $R_TLS != "$R_CONNS" ]]; then
                    problems+=("$case sessions=$sess $server run $r: only $R_TLS of $R_CONNS connections to the receiver used TLS")
                fi
            done
            order=("${order[1]}" "${order[0]}") # alternate who goes first
        done
    done
done

# ---------------------------------------------------------------- report
med() { tr ' ' '\n' <<<"$1" | grep . | median; }
mx() { tr ' ' '\n' <<<"$1" | grep . | sort -n | tail -1; }
echo
echo "RELAY: Moat vs Postfix, $MESSAGES messages of $SIZE bytes per cell, median of $REPEAT run(s); $NCPU cores; $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "injection: smtp-source (plaintext, one connection per message) into each relay; rate = messages counted at the receiver / (last counted - first injected)"
echo "Moat source: $MOAT_REV; Postfix $(postconf -c "$PF/etc" -h mail_version); both relays at TLS level may, $CONC parallel deliveries"
echo "sink = smtp-sink (plaintext); tls = Postfix receiver with STARTTLS (queue + discard), Postfix relay with its default smtp_tls_connection_reuse = no;"
echo "tlsreuse = the same receiver, Postfix relay with smtp_tls_connection_reuse = yes (Moat's behaviour is the same in both tls cases)"
echo "tlssink, tlssinkreuse = as tls and tlsreuse, to examples/tls_sink.rs (STARTTLS, keeps nothing) instead of a queueing Postfix"
echo
echo "| case | sessions | Postfix msg/s | Moat msg/s | ratio Moat/Postfix | relay CPU ms/msg Postfix / Moat | receiver CPU ms/msg (Postfix run / Moat run) | msgs per connection at receiver P / M | injection msg/s P / M | other CPU during run, max P / M |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for case in $CASES; do
    for sess in $SESSIONS; do
        k=$case.$sess
        p=$(med "${RATE[pf.$k]}") m=$(med "${RATE[moat.$k]}")
        ratio=$(echo "scale=2; $m / $p" | bc)
        echo "| $case | $sess | $p | $m | $ratio | $(med "${CPU[pf.$k]}") / $(med "${CPU[moat.$k]}") | $(med "${RCPU[pf.$k]}") / $(med "${RCPU[moat.$k]}") | $(med "${PERCONN[pf.$k]}") / $(med "${PERCONN[moat.$k]}") | $(med "${INJ[pf.$k]}") / $(med "${INJ[moat.$k]}") | $(mx "${OTHER[pf.$k]}")% / $(mx "${OTHER[moat.$k]}")% |"
    done
done
echo
echo "Single runs (msg/s, Postfix then Moat):"
for case in $CASES; do
    for sess in $SESSIONS; do
        echo "  $case/$sess: Postfix ${RATE[pf.$case.$sess]% }; Moat ${RATE[moat.$case.$sess]% }"
    done
done
echo "other CPU during run = machine CPU used by neither that relay, the receiver nor the load client, in % of $NCPU cores"
echo "uptime at start: $UPTIME_START"
echo "uptime now:      $(uptime)"
errs=$(grep -cE ' (WARN|ERROR) ' "$MOAT_LOGFILE" || true)
echo "Moat log: $(moat_accepted) accepted, $(grep -cF ': delivered ' "$MOAT_LOGFILE" || true) delivered ($(grep -F ': delivered ' "$MOAT_LOGFILE" | grep -c '(TLSv1' || true) of them over TLS), $errs WARN/ERROR lines"
if ((errs > 0)); then grep -E ' (WARN|ERROR) ' "$MOAT_LOGFILE" | sed 's/^.*Z //' | cut -c1-200 | sort | uniq -c | sort -rn | head -10; fi
for inst in "$PF:Postfix relay" "$RCV:Postfix receiver"; do
    d=${inst%%:*} name=${inst#*:}
    e=$(grep -cE 'warning|fatal|panic|error' "$d/log/maillog" || true)
    echo "$name log: $(grep -c 'postfix/cleanup.*message-id=' "$d/log/maillog" || true) queued, $(grep -c 'status=sent' "$d/log/maillog" || true) sent/discarded, $e warning/error lines"
    if ((e > 0)); then grep -E 'warning|fatal|panic|error' "$d/log/maillog" | cut -d' ' -f5- | sed 's/\[[0-9]*\]//; s/[0-9A-F]\{10,\}/ID/g' | cut -c1-200 | sort | uniq -c | sort -rn | head -10; fi
done
if ((${#problems[@]})); then
    echo "PROBLEMS:"
    printf '  %s\n' "${problems[@]}"
    exit 2
fi
echo "All runs: every message accepted, relayed and counted at the receiver, queues drained, no deferrals, no client failures."
