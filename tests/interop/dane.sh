#!/usr/bin/env bash
# DANE interop suite (RFC 7672): Moat against real DNSSEC and real DANE peers.
#
#   Knot      authoritative, signs its zones itself (dnssec-signing, automatic, ECDSA P-256 CSKs
#             made with keymgr): dane.test. (NSEC) with the child zones nsec3.dane.test. (NSEC3,
#             delegated with its real DS) and bogus.dane.test. (delegated with a wrong DS, so
#             everything in it is bogus), on 127.0.22.53:53.
#   Unbound   validating resolver ("validator iterator") on 127.0.22.54:53: stub zone dane.test.
#             to Knot, the DS of dane.test. as its trust anchor, everything else refused.
#   Postfix   as a DANE sender (smtp_tls_security_level = dane, smtp_dns_support_level = dnssec,
#             /etc/resolv.conf bind-mounted in its own mount namespace to name Unbound, with
#             `options trust-ad`) delivering to a Moat receiver whose TLSA record Moat printed;
#             and as the receiver of Moat's DANE deliveries (one address with STARTTLS, one
#             without).
#   Moat      as a DANE sender twice: trusting Unbound's AD bit (`[dane] resolver_validates`),
#             and validating in-process from the DNSKEY of dane.test. against Knot directly.
#   Checkers  posttls-finger and `moat probe --dane` judge the same receivers and must agree;
#             `moat check --dane` gives the same verdicts, through Unbound and validating itself.
#
# Cases, each sender against each kind of receiving host: TLSA 3 1 1 of its key (delivered,
# verified by DANE), a wrong TLSA record (deferred: Moat 4.7.323, Postfix "Server certificate
# not verified"), a TLSA record but no STARTTLS (deferred 4.7.321, nothing sent in plaintext),
# no TLSA record, denied by NSEC3 (delivered with opportunistic TLS), a bogus zone (deferred,
# the host never used). Every receiver listens on port 25 of its own 127.0.22.x address.
#
# Runs on a fresh Debian 12 machine as root: installs what it needs (apt, `apt-get update` only
# when something is missing), builds nothing but the moat binary if it is missing, uses only
# 127.0.22.1-127.0.22.60, cleans up every daemon it started.
#
#   MOAT_BIN=/path/to/moat tests/interop/dane.sh      INTEROP_KEEP=1 keeps the work dir
#
# Ends with one line `interop: N passed, M failed` and exits non-zero when M > 0.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
MOAT="${MOAT_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/debug/moat}"
START=$(date +%s)

# Addresses (each one a "host"; all of them on lo).
KNOT_IP=127.0.22.53      # Knot, authoritative for dane.test. and its children
UNB_IP=127.0.22.54       # Unbound, validating resolver
MRX_IP=127.0.22.11       # Moat receiver (Postfix sends to it): mx.moat-good, mx.moat-bad, mx.moat.nsec3
PRX_TLS=127.0.22.21      # Postfix receiver with STARTTLS: mx.pf-good, mx.pf-bad, mx.nsec3
PRX_PLAIN=127.0.22.22    # Postfix receiver without STARTTLS: mx.pf-notls (has a TLSA record)
MTXA_IP=127.0.22.31      # Moat sender A: resolver_validates through Unbound
MTXB_IP=127.0.22.32      # Moat sender B: in-process validation against Knot, DNSKEY trust anchor
PTX_IP=127.0.22.41       # Postfix sender (smtp_bind_address)
TX_PORT=2525             # where the Moat senders take the mail this script injects

log() { printf '== %s\n' "$*"; }

# ---------------------------------------------------------------------------------------------
# 1. Dependencies
# ---------------------------------------------------------------------------------------------
need_pkgs=()
for p in knot knot-dnsutils unbound bind9-dnsutils postfix openssl python3 ca-certificates \
         iproute2 procps util-linux mount bsdutils; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed'; then
        need_pkgs+=("$p")
    fi
done
if ((${#need_pkgs[@]})); then
    log "installing: ${need_pkgs[*]}"
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi
for tool in knotd keymgr unbound unbound-checkconf dig openssl python3 script unshare mount ss ps \
            posttls-finger; do
    command -v "$tool" >/dev/null || { echo "interop: required tool $tool is missing after install" >&2; exit 2; }
done
[[ -x /usr/sbin/postfix && -x /usr/sbin/sendmail ]] || { echo "interop: postfix is missing after install" >&2; exit 2; }
[[ -e /etc/resolv.conf ]] || { echo "interop: /etc/resolv.conf is missing (it is bind-mounted over for Postfix)" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "interop: must run as root (port 25, unshare --mount)" >&2; exit 2; }

if [[ ! -x "$MOAT" ]]; then
    if [[ -z "${MOAT_BIN:-}" ]]; then
        log "building moat (debug)"
        (cd "$REPO" && cargo build --quiet --bins)
    fi
    [[ -x "$MOAT" ]] || { echo "interop: moat binary not found at $MOAT" >&2; exit 2; }
fi

# ---------------------------------------------------------------------------------------------
# 2. Work dir, cleanup, bookkeeping, readiness helpers
# ---------------------------------------------------------------------------------------------
W=$(mktemp -d /tmp/moat-dane.XXXXXX)
chmod 755 "$W"   # Postfix daemons run as the postfix user and must reach their queue under $W
KNOT_PID=""
UNB_PID=""
MRX_PID=""
MTXA_PID=""
MTXB_PID=""
PR="$W/postfix-rx"     # Postfix receiver
PR_DIR="$PR/etc"
PR_STARTED=0
PT="$W/postfix-tx"     # Postfix DANE sender
PT_DIR="$PT/etc"
PT_STARTED=0

# stop_pid PID: SIGTERM, wait up to 5 s, then SIGKILL.
stop_pid() {
    local pid=$1
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
}

# stop_postfix CONFIG_DIR QUEUE_DIR: postfix stop, then make sure its master is gone.
stop_postfix() {
    local dir=$1 queue=$2 mpid
    mpid=$(tr -d ' \n' <"$queue/pid/master.pid" 2>/dev/null || true)
    postfix -c "$dir" stop >/dev/null 2>&1
    if [[ -n "$mpid" ]]; then
        for _ in $(seq 50); do kill -0 "$mpid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$mpid" 2>/dev/null
    fi
}

cleanup() {
    local rc=$?
    set +e
    stop_pid "$MTXA_PID"
    stop_pid "$MTXB_PID"
    stop_pid "$MRX_PID"
    ((PT_STARTED)) && stop_postfix "$PT_DIR" "$PT/queue"
    ((PR_STARTED)) && stop_postfix "$PR_DIR" "$PR/queue"
    stop_pid "$UNB_PID"
    stop_pid "$KNOT_PID"
    if [[ -n "${INTEROP_KEEP:-}" ]]; then
        echo "interop: work dir kept: $W" >&2
    else
        rm -rf "$W"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

PASSED=0
FAILED=0
FAILED_NAMES=()
pass() { PASSED=$((PASSED + 1)); printf 'PASS  %s\n' "$1"; }
# fail NAME REASON [FILE...]: prints the reason and the files (or strings) as evidence.
fail() {
    local name=$1 reason=$2
    shift 2
    FAILED=$((FAILED + 1))
    FAILED_NAMES+=("$name")
    printf 'FAIL  %s: %s\n' "$name" "$reason"
    local f
    for f in "$@"; do
        printf -- '  ---- evidence: %s ----\n' "$(basename -- "$f" | cut -c1-60)"
        if [[ -f "$f" ]]; then sed 's/^/  | /' "$f" | tail -n 60; else printf '  | %s\n' "$f"; fi
    done
}
# fatal REASON [FILE...]: a server the rest depends on did not start; report and stop.
fatal() {
    fail "$@"
    echo "run time: $(($(date +%s) - START)) s"
    echo "interop: $PASSED passed, $FAILED failed"
    exit 1
}

# alive PID: the process exists and is not a zombie.
alive() {
    local st
    st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ -n "$st" && "$st" != Z* ]]
}

# wait_listener NAME PID tcp|udp HOST:PORT SECS: waits until every socket listening on
# HOST:PORT belongs to process PID (a pre-forked server's workers share the line). Returns 1
# with the reason on stderr when PID exits, another process holds the address, or after SECS.
wait_listener() {
    local name=$1 pid=$2 proto=$3 hp=$4 secs=$5 flags=-Hltnp owners
    [[ "$proto" == udp ]] && flags=-Hlunp
    local end=$((SECONDS + secs))
    while ((SECONDS < end)); do
        owners=$(ss "$flags" src "$hp" 2>/dev/null || true)
        if [[ -n "$owners" ]]; then
            if ! grep -vqF "pid=$pid," <<<"$owners"; then return 0; fi
            # ss maps sockets to processes from a /proc scan made before it lists the sockets:
            # a socket bound in between shows no owner yet. Only a named other owner is final.
            if grep -v "pid=$pid," <<<"$owners" | grep -qF 'pid='; then
                echo "interop: address in use: another process already listens on $hp ($proto), not $name (pid $pid): $owners" >&2
                return 1
            fi
        fi
        if ! alive "$pid"; then
            echo "interop: $name (pid $pid) exited before it listened on $hp ($proto)" >&2
            return 1
        fi
        sleep 0.1
    done
    echo "interop: $name (pid $pid) did not listen on $hp ($proto) within $secs s${owners:+ (held by: $owners)}" >&2
    return 1
}

# wait_moat_ready NAME PID LOG SECS ADDR: waits for Moat's own "moat: listening on ADDR (" and
# "moat: ready (pid PID)" lines in LOG; returns 1 with the reason on stderr (at once if PID exits).
wait_moat_ready() {
    local name=$1 pid=$2 log=$3 secs=$4 addr=$5
    local end=$((SECONDS + secs))
    while ((SECONDS < end)); do
        if grep -qF "moat: listening on $addr (" "$log" 2>/dev/null \
           && grep -qxF "moat: ready (pid $pid)" "$log" 2>/dev/null; then
            return 0
        fi
        if ! alive "$pid"; then
            echo "interop: $name (pid $pid) exited before it was ready: $(grep -m 1 -E 'cannot listen|error' "$log" || echo 'see its log')" >&2
            return 1
        fi
        sleep 0.1
    done
    echo "interop: $name (pid $pid) did not report listening on $addr and ready within $secs s" >&2
    return 1
}

# wait_grep SECS FILE ERE: waits until FILE has a line matching ERE; prints the first one.
wait_grep() {
    local secs=$1 file=$2 re=$3 end=$((SECONDS + $1)) l
    while ((SECONDS < end)); do
        l=$(grep -m 1 -E -- "$re" "$file" 2>/dev/null || true)
        [[ -n "$l" ]] && { printf '%s\n' "$l"; return 0; }
        sleep 0.2
    done
    return 1
}

# wait_mail DIR SECS TOKEN [LOG ERE]: waits for a file under DIR containing TOKEN; prints its
# path. Gives up early when the sender's LOG has a line matching ERE (the message was refused).
wait_mail() {
    local dir=$1 end=$((SECONDS + $2)) tok=$3 glog=${4:-} gre=${5:-} f
    while ((SECONDS < end)); do
        f=$(grep -rlF -- "$tok" "$dir" 2>/dev/null | head -n 1 || true)
        [[ -n "$f" ]] && { echo "$f"; return 0; }
        [[ -n "$glog" ]] && grep -qE -- "$gre" "$glog" 2>/dev/null && return 1
        sleep 0.2
    done
    return 1
}

# dig_until SECS DIG-ARGS... -- ERE: repeats the query until its output matches ERE.
dig_until() {
    local secs=$1
    shift
    local args=() end
    while [[ $1 != -- ]]; do args+=("$1"); shift; done
    local re=$2
    end=$((SECONDS + secs))
    while ((SECONDS < end)); do
        dig +time=1 +tries=1 "${args[@]}" 2>&1 | grep -qE -- "$re" && return 0
        sleep 0.1
    done
    return 1
}

# Resolver view of the Postfix sender, posttls-finger and `moat probe`: Unbound, AD trusted.
RESOLV="$W/resolv.conf"
printf 'nameserver %s\noptions trust-ad\n' "$UNB_IP" >"$RESOLV"
chmod 644 "$RESOLV"
cat >"$W/in-ns.sh" <<EOF
#!/bin/sh
# Runs "\$@" in this (new, private) mount namespace with /etc/resolv.conf naming Unbound.
mount --bind "$RESOLV" /etc/resolv.conf || exit 97
exec "\$@"
EOF
chmod 755 "$W/in-ns.sh"
# in_ns CMD...: CMD with /etc/resolv.conf -> Unbound; the rest of the machine is untouched.
in_ns() { unshare --mount --propagation private "$W/in-ns.sh" "$@"; }

log "work dir $W"
cd "$W"

# ---------------------------------------------------------------------------------------------
# 3. Certificates (self-signed: DANE-EE 3 1 1 ignores names, issuers and dates)
# ---------------------------------------------------------------------------------------------
selfsigned() {   # selfsigned NAME FILE-PREFIX
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 -days 2 \
        -subj "/CN=$1" -addext "subjectAltName=DNS:$1" -addext "basicConstraints=critical,CA:FALSE" \
        -keyout "$2.key" -out "$2.crt"
}
# spki_sha256 CERT: the data of a `3 1 1` record, computed by OpenSSL.
spki_sha256() {
    openssl x509 -in "$1" -noout -pubkey | openssl pkey -pubin -outform DER | openssl dgst -sha256 -r | cut -d' ' -f1
}
{
    selfsigned mx.moat-good.dane.test moat-rx
    selfsigned mx.pf-good.dane.test pf-rx
    selfsigned out.moat.dane.test moat-tx
} >"$W/openssl.log" 2>&1 || { cat "$W/openssl.log"; echo "interop: making certificates failed" >&2; exit 2; }
chmod 644 ./*.crt
PF_TLSA=$(spki_sha256 pf-rx.crt)
WRONG_TLSA=$(printf '5a%.0s' {1..32})   # 5a5a...5a: matches no key

# ---------------------------------------------------------------------------------------------
# 4. The Moat receiver's config; its TLSA record as `moat dane tlsa` prints it
# ---------------------------------------------------------------------------------------------
MRX_DATA="$W/moat-rx-data"
MRX_CFG="$W/moat-rx.toml"
cat >"$MRX_CFG" <<EOF
hostname = "mx.moat-good.dane.test"
data_dir = "$MRX_DATA"

[[listener]]
name = "mx"
address = "$MRX_IP:25"
mode = "smtp"

[[tls.certificate]]
cert = "$W/moat-rx.crt"
key = "$W/moat-rx.key"

# For \`moat dane tlsa\`: what DNS publishes, DNSSEC-validated by Unbound.
[outbound]
nameservers = ["$UNB_IP:53"]

[mta_sts]
enabled = false

[dane]
resolver_validates = true
check_secure = "dane.test"
check_bogus = "mx.bogus.dane.test"

[[domain]]
name = "moat-good.dane.test"
route = "maildir"

[[domain]]
name = "moat-bad.dane.test"
route = "maildir"

[[domain]]
name = "moat.nsec3.dane.test"
route = "maildir"
EOF

name="moat dane tlsa --offline prints _25._tcp.mx.moat-good.dane.test. IN TLSA 3 1 1, the SPKI SHA-256 OpenSSL computes"
rc=0
"$MOAT" dane tlsa --config "$MRX_CFG" --offline >"$W/dane-tlsa-offline.out" 2>&1 || rc=$?
MOAT_TLSA=$(grep -oE '^ +_25\._tcp\.mx\.moat-good\.dane\.test\. IN TLSA 3 1 1 [0-9a-f]{64}$' "$W/dane-tlsa-offline.out" \
            | awk '{print $NF}' | head -n 1 || true)
if ((rc == 0)) && [[ -n "$MOAT_TLSA" && "$MOAT_TLSA" == "$(spki_sha256 moat-rx.crt)" ]]; then
    pass "$name"
else
    fail "$name" "exit $rc; moat printed '${MOAT_TLSA:-nothing}', openssl says $(spki_sha256 moat-rx.crt)" "$W/dane-tlsa-offline.out"
    [[ -n "$MOAT_TLSA" ]] || MOAT_TLSA=$(spki_sha256 moat-rx.crt)   # go on with OpenSSL's
fi

# ---------------------------------------------------------------------------------------------
# 5. Knot: keys (keymgr), zones, automatic signing
# ---------------------------------------------------------------------------------------------
K="$W/knot"
mkdir -p "$K/db" "$K/zones" "$K/run"
cat >"$K/knot.conf" <<EOF
server:
    listen: $KNOT_IP@53
    rundir: $K/run
database:
    storage: $K/db
log:
  - target: stderr
    any: info
policy:
  - id: nsec
    algorithm: ecdsap256sha256
    single-type-signing: on
    nsec3: off
  - id: nsec3
    algorithm: ecdsap256sha256
    single-type-signing: on
    nsec3: on
    nsec3-iterations: 0
    nsec3-salt-length: 0
template:
  - id: default
    storage: $K/zones
    zonefile-sync: -1
    zonefile-load: difference-no-serial
    journal-content: all
    serial-policy: unixtime
    dnssec-signing: on
    dnssec-policy: nsec
zone:
  - domain: dane.test.
  - domain: nsec3.dane.test.
    dnssec-policy: nsec3
  - domain: bogus.dane.test.
EOF
# One CSK per zone, made before knotd starts so that the parent can carry the children's DS.
for z in dane.test. nsec3.dane.test. bogus.dane.test.; do
    keymgr -c "$K/knot.conf" "$z" generate algorithm=ecdsap256sha256 ksk=yes zsk=yes >>"$K/keymgr.log" 2>&1 \
        || { cat "$K/keymgr.log"; echo "interop: keymgr generate $z failed" >&2; exit 2; }
done
ds_of() { keymgr -c "$K/knot.conf" "$1" ds | awk '$5 == 2 {print $3, $4, $5, $6}'; }
DS_TOP=$(ds_of dane.test.)
DS_NSEC3=$(ds_of nsec3.dane.test.)
read -r bt ba bd _ <<<"$(ds_of bogus.dane.test.)"
DS_BOGUS="$bt $ba $bd $(printf '%064d' 0)"     # right key tag, wrong digest: the child is bogus
# Moat's in-process trust anchor: the DNSKEY of dane.test., as `dig DNSKEY` prints it.
keymgr -c "$K/knot.conf" dane.test. dnskey | awk '{k=$1" 3600 IN"; for (i=2;i<=NF;i++) k=k" "$i; print k}' >"$W/anchor.keys"
[[ -n "$DS_TOP" && -n "$DS_NSEC3" && -n "$bt" ]] && grep -q 'DNSKEY 257 3 13 ' "$W/anchor.keys" \
    || { cat "$K/keymgr.log" "$W/anchor.keys"; echo "interop: no DS/DNSKEY from keymgr" >&2; exit 2; }

cat >"$K/zones/dane.test.zone" <<EOF
\$ORIGIN dane.test.
\$TTL 300
@                           SOA   ns hostmaster 1 3600 600 86400 300
@                           NS    ns
ns                          A     $KNOT_IP
nsec3                       NS    ns
nsec3                       DS    $DS_NSEC3
bogus                       NS    ns
bogus                       DS    $DS_BOGUS
; Moat receiver (the Postfix sender delivers to it)
moat-good                   MX    10 mx.moat-good
mx.moat-good                A     $MRX_IP
_25._tcp.mx.moat-good       TLSA  3 1 1 $MOAT_TLSA
moat-bad                    MX    10 mx.moat-bad
mx.moat-bad                 A     $MRX_IP
_25._tcp.mx.moat-bad        TLSA  3 1 1 $WRONG_TLSA
; Postfix receiver (the Moat senders deliver to it)
pf-good                     MX    10 mx.pf-good
mx.pf-good                  A     $PRX_TLS
_25._tcp.mx.pf-good         TLSA  3 1 1 $PF_TLSA
pf-bad                      MX    10 mx.pf-bad
mx.pf-bad                   A     $PRX_TLS
_25._tcp.mx.pf-bad          TLSA  3 1 1 $WRONG_TLSA
pf-notls                    MX    10 mx.pf-notls
mx.pf-notls                 A     $PRX_PLAIN
_25._tcp.mx.pf-notls        TLSA  3 1 1 $PF_TLSA
EOF
cat >"$K/zones/nsec3.dane.test.zone" <<EOF
\$ORIGIN nsec3.dane.test.
\$TTL 300
@                           SOA   ns.dane.test. hostmaster.dane.test. 1 3600 600 86400 300
@                           NS    ns.dane.test.
; no TLSA records in this zone: NSEC3 proves there are none
@                           MX    10 mx
mx                          A     $PRX_TLS
moat                        MX    10 mx.moat
mx.moat                     A     $MRX_IP
EOF
cat >"$K/zones/bogus.dane.test.zone" <<EOF
\$ORIGIN bogus.dane.test.
\$TTL 300
@                           SOA   ns.dane.test. hostmaster.dane.test. 1 3600 600 86400 300
@                           NS    ns.dane.test.
@                           MX    10 mx
mx                          A     $PRX_TLS
_25._tcp.mx                 TLSA  3 1 1 $PF_TLSA
EOF

log "starting knotd on $KNOT_IP:53"
knotd -c "$K/knot.conf" >"$K/knot.log" 2>&1 &
KNOT_PID=$!
wait_listener knotd "$KNOT_PID" udp "$KNOT_IP:53" 20 2>"$W/knot-listen.err" \
    && wait_listener knotd "$KNOT_PID" tcp "$KNOT_IP:53" 20 2>>"$W/knot-listen.err" \
    || fatal "knotd listens on $KNOT_IP:53" "$(cat "$W/knot-listen.err")" "$K/knot.log"
# Ready once every zone answers signed.
for z in dane.test. nsec3.dane.test. bogus.dane.test.; do
    dig_until 20 +norec +dnssec @"$KNOT_IP" SOA "$z" -- "^$z[[:space:]].*RRSIG[[:space:]]+SOA " \
        || fatal "knotd serves $z signed" "no RRSIG SOA for $z within 20 s" "$K/knot.log"
done

name="Knot signs dane.test. (NSEC) and nsec3.dane.test. (NSEC3PARAM 1 0 0 -), and serves the DS of nsec3.dane.test. from the parent"
dig +norec +dnssec @"$KNOT_IP" NSEC3PARAM nsec3.dane.test. >"$W/dig-nsec3param.out" 2>&1 || true
dig +norec +dnssec @"$KNOT_IP" NSEC dane.test. >"$W/dig-nsec.out" 2>&1 || true
dig +norec +dnssec @"$KNOT_IP" DS nsec3.dane.test. >"$W/dig-ds.out" 2>&1 || true
if grep -qE '^nsec3\.dane\.test\.[[:space:]].*NSEC3PARAM[[:space:]]+1 0 0 -' "$W/dig-nsec3param.out" \
   && grep -qE '^dane\.test\.[[:space:]].*[[:space:]]NSEC[[:space:]]' "$W/dig-nsec.out" \
   && grep -qE "RRSIG[[:space:]]+DS 13 3 300 [0-9]+ [0-9]+ [0-9]+ dane\.test\." "$W/dig-ds.out"; then
    pass "$name"
else
    fail "$name" "missing NSEC3PARAM / NSEC / signed DS" "$W/dig-nsec3param.out" "$W/dig-nsec.out" "$W/dig-ds.out"
fi

# ---------------------------------------------------------------------------------------------
# 6. Unbound: validating resolver for dane.test. (and nothing else)
# ---------------------------------------------------------------------------------------------
U="$W/unbound"
mkdir -p "$U"
cat >"$U/unbound.conf" <<EOF
server:
    interface: $UNB_IP
    outgoing-interface: $UNB_IP
    port: 53
    do-ip6: no
    username: ""
    chroot: ""
    directory: "$U"
    pidfile: "$U/unbound.pid"
    use-syslog: no
    logfile: ""
    verbosity: 1
    val-log-level: 2
    log-servfail: yes
    access-control: 127.0.0.0/8 allow
    # test. is refused by default (RFC 6761) and 127/8 is never queried by default.
    local-zone: "test." nodefault
    do-not-query-localhost: no
    module-config: "validator iterator"
    # Refuse everything but dane.test. (nothing leaks to the Internet).
    local-zone: "." refuse
    local-zone: "dane.test." transparent
    trust-anchor: "dane.test. DS $DS_TOP"
stub-zone:
    name: "dane.test."
    stub-addr: $KNOT_IP@53
remote-control:
    control-enable: no
EOF
unbound-checkconf "$U/unbound.conf" >"$U/checkconf.out" 2>&1 \
    || fatal "unbound-checkconf accepts the config" "rejected" "$U/checkconf.out"
log "starting unbound on $UNB_IP:53"
unbound -d -c "$U/unbound.conf" >"$U/unbound.log" 2>&1 &
UNB_PID=$!
wait_listener unbound "$UNB_PID" udp "$UNB_IP:53" 20 2>"$W/unbound-listen.err" \
    || fatal "unbound listens on $UNB_IP:53" "$(cat "$W/unbound-listen.err")" "$U/unbound.log"
dig_until 20 +dnssec @"$UNB_IP" SOA dane.test. -- '^;; flags: qr rd ra ad;' \
    || fatal "unbound validates dane.test." "no answer with the ad flag within 20 s" "$U/unbound.log"

# ucheck NAME TYPE QNAME STATUS AD(yes|no) [ERE...]: a dig +dnssec through Unbound.
ucheck() {
    local name=$1 type=$2 q=$3 status=$4 ad=$5 out
    shift 5
    out="$W/dig-unbound-$type-$q.out"
    dig +dnssec +time=2 +tries=1 @"$UNB_IP" "$type" "$q" >"$out" 2>&1 || true
    local flags
    flags=$(grep -m 1 '^;; flags:' "$out" || true)
    if ! grep -q "status: $status," "$out"; then
        fail "$name" "want status $status" "$out"; return
    fi
    if [[ $ad == yes && $flags != *" ad;"* && $flags != *" ad "* ]] || [[ $ad == no && ( $flags == *" ad;"* || $flags == *" ad "* ) ]]; then
        fail "$name" "want ad flag: $ad; got '$flags'" "$out"; return
    fi
    local re
    for re in "$@"; do
        grep -qE -- "$re" "$out" || { fail "$name" "no line matching /$re/" "$out"; return; }
    done
    pass "$name"
}
ucheck "Unbound: TLSA _25._tcp.mx.moat-good.dane.test is validated (ad) and is Moat's 3 1 1" \
    TLSA _25._tcp.mx.moat-good.dane.test. NOERROR yes \
    "TLSA[[:space:]]+3 1 1 $(tr a-f A-F <<<"${MOAT_TLSA:0:32}")"
ucheck "Unbound: MX pf-good.dane.test validated (ad)" MX pf-good.dane.test. NOERROR yes 'MX[[:space:]]+10 mx\.pf-good\.dane\.test\.'
ucheck "Unbound: no TLSA for mx.nsec3.dane.test: NXDOMAIN proved by NSEC3, validated (ad)" \
    TLSA _25._tcp.mx.nsec3.dane.test. NXDOMAIN yes '[[:space:]]NSEC3[[:space:]]+1 0 0 -'
ucheck "Unbound: mx.bogus.dane.test (wrong DS in the parent) is refused: SERVFAIL" A mx.bogus.dane.test. SERVFAIL no
ucheck "Unbound: names outside dane.test. are refused" A example.com. REFUSED no
name="Unbound logs the validation failure of bogus.dane.test. (DS hash mismatch)"
if wait_grep 5 "$U/unbound.log" 'validation failure <mx\.bogus\.dane\.test\. A IN>: .*DS' >/dev/null; then
    pass "$name"
else
    fail "$name" "no 'validation failure' line" "$U/unbound.log"
fi

# ---------------------------------------------------------------------------------------------
# 7. Receivers: Moat (for the Postfix sender), Postfix (for the Moat senders)
# ---------------------------------------------------------------------------------------------
log "starting the Moat receiver on $MRX_IP:25"
"$MOAT" serve --config "$MRX_CFG" >"$W/moat-rx.log" 2>&1 &
MRX_PID=$!

mkdir -p "$PR_DIR" "$PR/queue" "$PR/data" "$PR/log" "$PR/vmail"
chown postfix "$PR/data"
chown "$(id -u nobody):$(id -g nobody)" "$PR/vmail"
chmod 755 "$PR" "$PR/log" "$PR/vmail"
cat >"$PR_DIR/vmailbox" <<'EOF'
@pf-good.dane.test      pf-good/
@pf-bad.dane.test       pf-bad/
@pf-notls.dane.test     pf-notls/
@nsec3.dane.test        nsec3/
@bogus.dane.test        bogus/
EOF
chmod 644 "$PR_DIR/vmailbox"
# Common main.cf lines of both Postfix instances.
pf_common() {   # pf_common BASE HOSTNAME
    cat <<EOF
compatibility_level = 3.6
config_directory = $1/etc
queue_directory = $1/queue
data_directory = $1/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = $2
mydomain = dane.test
myorigin = \$myhostname
mydestination =
alias_maps =
alias_database =
local_recipient_maps =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost =
maillog_file = $1/log/maillog
maillog_file_prefixes = $1/log
smtpd_peername_lookup = no
EOF
}
MASTER_CF_BASE='pickup      unix  n       -       n       60      1       pickup
cleanup     unix  n       -       n       -       0       cleanup
qmgr        unix  n       -       n       300     1       qmgr
tlsmgr      unix  -       -       n       1000?   1       tlsmgr
rewrite     unix  -       -       n       -       -       trivial-rewrite
bounce      unix  -       -       n       -       0       bounce
defer       unix  -       -       n       -       0       bounce
trace       unix  -       -       n       -       0       bounce
verify      unix  -       -       n       -       1       verify
flush       unix  n       -       n       1000?   0       flush
proxymap    unix  -       -       n       -       -       proxymap
showq       unix  n       -       n       -       -       showq
error       unix  -       -       n       -       -       error
retry       unix  -       -       n       -       -       error
discard     unix  -       -       n       -       -       discard
anvil       unix  -       -       n       -       1       anvil
scache      unix  -       -       n       -       1       scache
postlog     unix-dgram n  -       n       -       1       postlogd
smtp        unix  -       -       n       -       -       smtp
virtual     unix  -       n       n       -       -       virtual'
{
    pf_common "$PR" mx.pf-good.dane.test
    cat <<EOF
smtp_dns_support_level = disabled
virtual_mailbox_domains = pf-good.dane.test pf-bad.dane.test pf-notls.dane.test nsec3.dane.test bogus.dane.test
virtual_mailbox_base = $PR/vmail
virtual_mailbox_maps = texthash:$PR_DIR/vmailbox
virtual_uid_maps = static:$(id -u nobody)
virtual_gid_maps = static:$(id -g nobody)
smtpd_tls_security_level = may
smtpd_tls_cert_file = $W/pf-rx.crt
smtpd_tls_key_file = $W/pf-rx.key
smtpd_tls_received_header = yes
smtpd_tls_loglevel = 1
smtpd_tls_session_cache_database =
EOF
} >"$PR_DIR/main.cf"
cat >"$PR_DIR/master.cf" <<EOF
$PRX_TLS:25 inet n - n - - smtpd
  -o syslog_name=postfix-rx-tls
$PRX_PLAIN:25 inet n - n - - smtpd
  -o syslog_name=postfix-rx-plain
  -o smtpd_tls_security_level=none
$MASTER_CF_BASE
EOF

log "starting the Postfix receiver on $PRX_TLS:25 (STARTTLS) and $PRX_PLAIN:25 (no TLS)"
rc=0
script -qec "postfix -c $PR_DIR check" /dev/null >"$PR/check.out" 2>&1 || rc=$?
((rc == 0)) || fatal "Postfix receiver: postfix check" "failed (rc=$rc)" "$PR/check.out"
PR_STARTED=1
script -qec "postfix -c $PR_DIR start" /dev/null >"$PR/start.out" 2>&1 || rc=$?
pr_pid=$(tr -d ' \n' <"$PR/queue/pid/master.pid" 2>/dev/null || true)
if ((rc != 0)) || [[ -z "$pr_pid" ]] \
   || ! wait_listener "Postfix receiver" "$pr_pid" tcp "$PRX_TLS:25" 20 2>"$PR/listen.err" \
   || ! wait_listener "Postfix receiver" "$pr_pid" tcp "$PRX_PLAIN:25" 20 2>>"$PR/listen.err"; then
    fatal "Postfix receiver listens on $PRX_TLS:25 and $PRX_PLAIN:25" "rc=$rc, master ${pr_pid:-none}" \
        "$PR/listen.err" "$PR/start.out" "$PR/log/maillog"
fi

wait_moat_ready "Moat receiver" "$MRX_PID" "$W/moat-rx.log" 20 "$MRX_IP:25" 2>"$W/moat-rx-ready.err" \
    || fatal "Moat receiver listens on $MRX_IP:25" "$(cat "$W/moat-rx-ready.err")" "$W/moat-rx.log"

name="moat dane tlsa (online): the record Knot publishes and Unbound validates matches the certificate (exit 0, no WARN)"
rc=0
"$MOAT" dane tlsa --config "$MRX_CFG" >"$W/dane-tlsa-online.out" 2>&1 || rc=$?
if ((rc == 0)) && ! grep -q 'WARN' "$W/dane-tlsa-online.out" \
   && grep -q "_25._tcp.mx.moat-good.dane.test. IN TLSA 3 1 1 $MOAT_TLSA" "$W/dane-tlsa-online.out"; then
    pass "$name"
else
    fail "$name" "exit $rc" "$W/dane-tlsa-online.out"
fi

# ---------------------------------------------------------------------------------------------
# 8. Senders: Moat A (resolver_validates), Moat B (in-process, Knot directly), Postfix (dane)
# ---------------------------------------------------------------------------------------------
moat_sender_cfg() {   # moat_sender_cfg NAME IP OUTBOUND+DANE-TOML
    cat <<EOF
hostname = "out-$1.moat.dane.test"
data_dir = "$W/moat-tx-$1-data"

[[listener]]
name = "in"
address = "$2:$TX_PORT"
mode = "smtp"

[[tls.certificate]]
cert = "$W/moat-tx.crt"
key = "$W/moat-tx.key"

[relay]
trusted_networks = ["127.0.0.0/8"]

[queue]
retry_schedule_secs = [600]

[mta_sts]
enabled = false

$3
EOF
}
moat_sender_cfg a "$MTXA_IP" "[outbound]
nameservers = [\"$UNB_IP:53\"]
connect_timeout_secs = 5
dns_timeout_secs = 3

[dane]
resolver_validates = true
check_secure = \"dane.test\"
check_bogus = \"mx.bogus.dane.test\"" >"$W/moat-tx-a.toml"
moat_sender_cfg b "$MTXB_IP" "[outbound]
nameservers = [\"$KNOT_IP:53\"]
connect_timeout_secs = 5
dns_timeout_secs = 3

[dane]
trust_anchor_file = \"$W/anchor.keys\"
check_secure = \"dane.test\"
check_bogus = \"mx.bogus.dane.test\"" >"$W/moat-tx-b.toml"

for s in a b; do
    rc=0
    "$MOAT" config check "$W/moat-tx-$s.toml" >"$W/moat-tx-$s-check.out" 2>&1 || rc=$?
    ((rc == 0)) || fatal "moat config check (sender $s)" "exit $rc" "$W/moat-tx-$s-check.out"
done
log "starting Moat sender A ($MTXA_IP, trusts Unbound's AD bit) and B ($MTXB_IP, validates itself against Knot)"
"$MOAT" serve --config "$W/moat-tx-a.toml" >"$W/moat-tx-a.log" 2>&1 &
MTXA_PID=$!
"$MOAT" serve --config "$W/moat-tx-b.toml" >"$W/moat-tx-b.log" 2>&1 &
MTXB_PID=$!

# Postfix DANE sender.
mkdir -p "$PT_DIR" "$PT/queue" "$PT/data" "$PT/log"
chown postfix "$PT/data"
chmod 755 "$PT" "$PT/log"
{
    pf_common "$PT" out.postfix.dane.test
    cat <<EOF
smtp_bind_address = $PTX_IP
smtp_dns_support_level = dnssec
smtp_tls_security_level = dane
smtp_tls_loglevel = 1
smtp_tls_session_cache_database =
smtp_connection_cache_on_demand = no
# Postfix checks at start that DNSSEC answers come validated (AD); probe a name that is.
dnssec_probe = soa:dane.test
queue_run_delay = 300s
minimal_backoff_time = 300s
maximal_backoff_time = 600s
EOF
} >"$PT_DIR/main.cf"
printf '%s\n' "$MASTER_CF_BASE" >"$PT_DIR/master.cf"
rc=0
script -qec "postfix -c $PT_DIR check" /dev/null >"$PT/check.out" 2>&1 || rc=$?
((rc == 0)) || fatal "Postfix sender: postfix check" "failed (rc=$rc)" "$PT/check.out"
PT_STARTED=1
log "starting the Postfix DANE sender (own mount namespace: /etc/resolv.conf -> Unbound, trust-ad)"
script -qec "unshare --mount --propagation private $W/in-ns.sh postfix -c $PT_DIR start" /dev/null >"$PT/start.out" 2>&1 || rc=$?
pt_pid=$(tr -d ' \n' <"$PT/queue/pid/master.pid" 2>/dev/null || true)
if ((rc != 0)) || [[ -z "$pt_pid" ]] || ! alive "$pt_pid"; then
    fatal "Postfix sender starts" "rc=$rc, master ${pt_pid:-none}" "$PT/start.out" "$PT/log/maillog"
fi
name="Postfix sender runs with /etc/resolv.conf naming Unbound (its own mount namespace only)"
if [[ $(cat "/proc/$pt_pid/root/etc/resolv.conf" 2>/dev/null) == "$(cat "$RESOLV")" ]] \
   && [[ $(cat /etc/resolv.conf) != "$(cat "$RESOLV")" ]]; then
    pass "$name"
else
    fail "$name" "the master's /etc/resolv.conf is not the test one (or the host's was changed)" \
        "/proc/$pt_pid/root/etc/resolv.conf"
fi

for s in a b; do
    pid_var=MTXA_PID ip=$MTXA_IP
    [[ $s == b ]] && pid_var=MTXB_PID ip=$MTXB_IP
    wait_moat_ready "Moat sender $s" "${!pid_var}" "$W/moat-tx-$s.log" 20 "$ip:$TX_PORT" 2>"$W/moat-tx-$s-ready.err" \
        || fatal "Moat sender $s listens on $ip:$TX_PORT" "$(cat "$W/moat-tx-$s-ready.err")" "$W/moat-tx-$s.log"
    name="Moat sender $s: DANE self-check says validation works (check_secure dane.test, check_bogus mx.bogus.dane.test)"
    if l=$(wait_grep 20 "$W/moat-tx-$s.log" 'DANE (available|unavailable)') && [[ $l == *"DANE available: DNSSEC validation works"* ]]; then
        pass "$name"
    else
        fail "$name" "${l:-no DANE available/unavailable line within 20 s}" "$W/moat-tx-$s.log"
    fi
done

# ---------------------------------------------------------------------------------------------
# 9. Mail: into both Moat senders and the Postfix sender
# ---------------------------------------------------------------------------------------------
cat >"$W/inject.py" <<'PYEOF'
# inject.py HOST PORT FROM RCPT TOKEN: one message over SMTP; prints the DATA reply.
import smtplib, sys
host, port, frm, rcpt, tok = sys.argv[1:6]
s = smtplib.SMTP(host, int(port), timeout=20)
s.ehlo("client.dane.test")
s.mail(frm)
code, resp = s.rcpt(rcpt)
if code != 250:
    print(code, resp.decode()); sys.exit(1)
msg = ("From: <%s>\r\nTo: <%s>\r\nSubject: %s\r\nMessage-Id: <%s@client.dane.test>\r\n\r\nDANE interop %s\r\n"
       % (frm, rcpt, tok, tok, tok))
code, resp = s.data(msg.encode())
print(code, resp.decode())
s.quit()
sys.exit(0 if code == 250 else 1)
PYEOF
RUN_ID="$$-$RANDOM"
declare -A QID   # QID[sender:case] = Moat queue id
for s in a b; do
    ip=$MTXA_IP
    [[ $s == b ]] && ip=$MTXB_IP
    for c in pf-good pf-bad pf-notls nsec3 bogus; do
        tok="dane-$s-$c-$RUN_ID"
        out=$(python3 "$W/inject.py" "$ip" "$TX_PORT" "sender@client.dane.test" "u@$c.dane.test" "$tok" 2>&1) \
            || fatal "inject into Moat sender $s for u@$c.dane.test" "$out"
        QID[$s:$c]=$(grep -oE 'queued as [^ ]+' <<<"$out" | awk '{print $3}')
    done
done
for c in moat-good moat-bad moat.nsec3; do
    tok="dane-pf-$c-$RUN_ID"
    printf 'From: <pfsender@client.dane.test>\nTo: <u@%s.dane.test>\nSubject: %s\nMessage-Id: <%s@client.dane.test>\n\nDANE interop %s\n' \
        "$c" "$tok" "$tok" "$tok" | sendmail -C "$PT_DIR" -f pfsender@client.dane.test -- "u@$c.dane.test" \
        || fatal "inject into the Postfix sender for u@$c.dane.test" "sendmail failed"
done

# ---------------------------------------------------------------------------------------------
# 10. Postfix (DANE sender) -> Moat receiver
# ---------------------------------------------------------------------------------------------
PTLOG="$PT/log/maillog"
name="Postfix DANE -> Moat (TLSA 3 1 1 that moat dane tlsa printed): Verified TLS, status=sent, in Moat's Maildir"
tok="dane-pf-moat-good-$RUN_ID"
if f=$(wait_mail "$MRX_DATA/mail" 30 "$tok" "$PTLOG" 'to=<u@moat-good\.dane\.test>.*status=(deferred|bounced)'); then
    if wait_grep 10 "$PTLOG" 'to=<u@moat-good\.dane\.test>.*relay=mx\.moat-good\.dane\.test\[127\.0\.22\.11\]:25.*status=sent' >/dev/null \
       && grep -qE "Verified TLS connection established to mx\.moat-good\.dane\.test\[$MRX_IP\]:25: TLSv1\.3" "$PTLOG" \
       && grep -q 'with ESMTPS' "$f"; then
        pass "$name"
    else
        fail "$name" "Moat got it, but Postfix's log lacks 'Verified TLS connection established ... TLSv1.3' / status=sent (or no ESMTPS stamp)" "$PTLOG" "$f"
    fi
else
    fail "$name" "nothing with $tok in the Moat receiver's Maildir (Postfix deferred it, or 30 s passed)" "$PTLOG" "$W/moat-rx.log"
fi

name="Postfix DANE -> wrong TLSA (mx.moat-bad): 'no matching DANE TLSA records', deferred 'Server certificate not verified', nothing delivered"
if l=$(wait_grep 30 "$PTLOG" 'to=<u@moat-bad\.dane\.test>.*status=(deferred|sent|bounced)'); then
    if [[ $l == *"status=deferred (Server certificate not verified)"* ]] \
       && grep -qE "server certificate verification failed for mx\.moat-bad\.dane\.test\[$MRX_IP\]:25: num=[0-9]+:no matching DANE TLSA records" "$PTLOG" \
       && ! grep -rqF "dane-pf-moat-bad-$RUN_ID" "$MRX_DATA/mail" 2>/dev/null; then
        pass "$name"
    else
        fail "$name" "$l" "$PTLOG"
    fi
else
    fail "$name" "no final status for u@moat-bad.dane.test within 30 s" "$PTLOG"
fi

name="Postfix DANE -> NSEC3-denied TLSA (mx.moat.nsec3): not DANE (Untrusted TLS), delivered"
tok="dane-pf-moat.nsec3-$RUN_ID"
if f=$(wait_mail "$MRX_DATA/mail" 30 "$tok" "$PTLOG" 'to=<u@moat\.nsec3\.dane\.test>.*status=(deferred|bounced)'); then
    if grep -qE "Untrusted TLS connection established to mx\.moat\.nsec3\.dane\.test\[$MRX_IP\]:25" "$PTLOG" \
       && grep -q 'with ESMTPS' "$f"; then
        pass "$name"
    else
        fail "$name" "delivered, but not logged as 'Untrusted TLS connection' (opportunistic)" "$PTLOG"
    fi
else
    fail "$name" "nothing with $tok in the Moat receiver's Maildir (Postfix deferred it, or 30 s passed)" "$PTLOG"
fi

name="Postfix sender: no 'DNSSEC validation may be unavailable' warning (AD reaches it through trust-ad)"
if grep -q 'DNSSEC validation may be unavailable' "$PTLOG"; then
    fail "$name" "Postfix says DNSSEC is unavailable" "$PTLOG"
else
    pass "$name"
fi

# ---------------------------------------------------------------------------------------------
# 11. Moat (DANE senders A and B) -> Postfix receiver
# ---------------------------------------------------------------------------------------------
PRLOG="$PR/log/maillog"
for s in a b; do
    L="$W/moat-tx-$s.log"
    case $s in
        a) how="resolver_validates via Unbound" ;;
        b) how="in-process validation against Knot" ;;
    esac

    name="Moat $s ($how) -> Postfix, correct TLSA: delivered, attempt logged level=dane, verified by DANE, why=DANE"
    tok="dane-$s-pf-good-$RUN_ID"
    if f=$(wait_mail "$PR/vmail/pf-good" 30 "$tok" "$L" 'not delivered .*to=u@pf-good\.dane\.test '); then
        att=$(grep -m 1 -E 'delivery attempt.*host="?mx\.pf-good\.dane\.test' "$L" || true)
        if [[ $att == *'level="dane"'* && $att == *"verified by DANE"* \
              && $att == *"why=DANE (TLSA records of mx.pf-good.dane.test, 1 usable record)"* ]] \
           && grep -qE "delivered .*to=u@pf-good\.dane\.test" "$L" \
           && grep -q 'using TLSv1\.3' "$f"; then
            pass "$name"
        else
            fail "$name" "delivered, but the attempt line is: ${att:-missing}" "$L" "$f"
        fi
    else
        fail "$name" "nothing with $tok in Postfix's Maildir (the sender deferred it, or 30 s passed)" "$L" "$PRLOG"
    fi

    name="Moat $s -> Postfix, wrong TLSA: deferred 4.7.323 (log and moat queue show), not delivered"
    if l=$(wait_grep 30 "$L" 'moat::queue: (not )?delivered .*to=u@pf-bad\.dane\.test '); then
        qs="$W/queue-show-$s-pf-bad.out"
        "$MOAT" queue show --config "$W/moat-tx-$s.toml" "${QID[$s:pf-bad]:-none}" >"$qs" 2>&1 || true
        if [[ $l == *"status=4.7.323"* && $l == *"matches none of the certificates"* ]] && grep -q '4\.7\.323' "$qs" \
           && ! grep -rqF "dane-$s-pf-bad-$RUN_ID" "$PR/vmail" 2>/dev/null; then
            pass "$name"
        else
            fail "$name" "$l" "$qs"
        fi
    else
        fail "$name" "no delivered/not delivered line for u@pf-bad.dane.test within 30 s" "$L"
    fi

    name="Moat $s -> Postfix without STARTTLS, TLSA published: deferred 4.7.321, only EHLO and QUIT sent in plaintext"
    if l=$(wait_grep 30 "$L" 'moat::queue: (not )?delivered .*to=u@pf-notls\.dane\.test '); then
        # Moat connected (Postfix logs the session's end) and sent EHLO and QUIT only.
        want_sessions=1
        [[ $s == b ]] && want_sessions=2
        end=$((SECONDS + 10))
        while (($(grep -c 'postfix-rx-plain/smtpd\[[0-9]*\]: disconnect from' "$PRLOG" || true) < want_sessions)) \
              && ((SECONDS < end)); do sleep 0.1; done
        sessions=$(grep 'postfix-rx-plain/smtpd\[[0-9]*\]: disconnect from' "$PRLOG" || true)
        if [[ $l == *"status=4.7.321"* ]] && ! grep -rqF "dane-$s-pf-notls-$RUN_ID" "$PR/vmail" 2>/dev/null \
           && (($(grep -c . <<<"$sessions") >= want_sessions)) && ! grep -qvE ' ehlo=1 quit=1 commands=2$' <<<"$sessions"; then
            pass "$name"
        else
            fail "$name" "$l" "$L" "$PRLOG"
        fi
    else
        fail "$name" "no delivered/not delivered line for u@pf-notls.dane.test within 30 s" "$L"
    fi

    name="Moat $s -> NSEC3 zone without TLSA (authenticated denial): delivered with opportunistic TLS (level=may)"
    tok="dane-$s-nsec3-$RUN_ID"
    if f=$(wait_mail "$PR/vmail/nsec3" 30 "$tok" "$L" 'not delivered .*to=u@nsec3\.dane\.test '); then
        att=$(grep -m 1 -E 'delivery attempt.*host="?mx\.nsec3\.dane\.test' "$L" || true)
        if [[ $att == *'level="may"'* && $att == *TLSv1.3* ]] && grep -q 'using TLSv1\.3' "$f"; then
            pass "$name"
        else
            fail "$name" "delivered, but the attempt line is: ${att:-missing}" "$L" "$f"
        fi
    else
        fail "$name" "nothing with $tok in Postfix's Maildir (the sender deferred it, or 30 s passed)" "$L" "$PRLOG"
    fi

    # Through Unbound the bogus answer is a SERVFAIL (no answer on a signed path: 4.4.312);
    # validating itself, Moat sees the bad DS (4.7.324). Either way the host is never used.
    want_code=4.4.312
    [[ $s == b ]] && want_code=4.7.324
    name="Moat $s -> bogus zone (wrong DS): deferred $want_code, the host never used"
    if l=$(wait_grep 30 "$L" 'moat::queue: (not )?delivered .*to=u@bogus\.dane\.test '); then
        if [[ $l == *"status=$want_code"* ]] && ! grep -qE 'delivery attempt.*host="?mx\.bogus\.dane\.test' "$L" \
           && ! grep -rqF "dane-$s-bogus-$RUN_ID" "$PR/vmail" 2>/dev/null; then
            pass "$name"
        else
            fail "$name" "$l" "$L"
        fi
    else
        fail "$name" "no delivered/not delivered line for u@bogus.dane.test within 30 s" "$L"
    fi
done

# ---------------------------------------------------------------------------------------------
# 12. posttls-finger, moat probe --dane and moat check --dane agree
# ---------------------------------------------------------------------------------------------
for target in "mx.moat-good.dane.test:good" "mx.moat-bad.dane.test:bad" "mx.pf-good.dane.test:good" "mx.pf-bad.dane.test:bad"; do
    host=${target%%:*}
    want=${target##*:}
    pt="$W/posttls-finger-$host.out"
    mp="$W/moat-probe-$host.out"
    prc=0
    # Both under the same resolv.conf (Unbound); posttls-finger reads the sender's main.cf.
    MAIL_CONFIG="$PT_DIR" timeout 60 unshare --mount --propagation private "$W/in-ns.sh" \
        posttls-finger -t30 -T180 -c -l dane -P /etc/ssl/certs "[$host]:25" >"$pt" 2>&1 || prc=$?
    mrc=0
    timeout 60 unshare --mount --propagation private "$W/in-ns.sh" \
        "$MOAT" probe "$host" --timeout 5 --dane --nameserver "$UNB_IP:53" --resolver-validates >"$mp" 2>&1 || mrc=$?
    # The key each tool saw: posttls-finger's pkey_fingerprint (SHA-256 of the SPKI, i.e. 3 1 1
    # data) and the 3 1 1 that moat probe says matched or was presented.
    pt_key=$(grep -m 1 -oE 'pkey_fingerprint=[0-9A-F:]+' "$pt" | cut -d= -f2 | tr -d : | tr A-F a-f || true)
    mp_key=$(grep -m 1 -oE '(verified: TLSA 3 1 1 [0-9a-f]{64} matches|it presented 3 1 1 [0-9a-f]{64})' "$mp" \
             | grep -oE '[0-9a-f]{64}' || true)
    if [[ $want == good ]]; then
        tlsa=$PF_TLSA
        [[ $host == mx.moat-* ]] && tlsa=$MOAT_TLSA
        name="posttls-finger and moat probe --dane agree: $host verified by its TLSA 3 1 1 (same key)"
        if ! grep -qE "posttls-finger: $host\[[0-9.]+\]:25: Matched DANE EE certificate at depth 0: 3 1 1 $(tr a-f A-F <<<"$tlsa")\$" "$pt" \
           || ! grep -qE "posttls-finger: Verified TLS connection established to $host\[[0-9.]+\]:25: TLSv1\.3" "$pt"; then
            fail "$name" "posttls-finger did not say 'Matched DANE EE certificate ... 3 1 1 <published>' and 'Verified TLS connection established'" "$pt"
        elif ((mrc != 0)) || ! grep -qE "^  tlsa +3 1 1 $tlsa \(matches the presented chain\)\$" "$mp" \
             || ! grep -qE "^  dane +verified: TLSA 3 1 1 $tlsa matches the server's certificate\$" "$mp" \
             || ! grep -qx "PASS  $host:25 offers STARTTLS with a certificate its DANE TLSA records authenticate" "$mp"; then
            fail "$name" "moat probe exit $mrc (want 0), or no '(matches the presented chain)' / 'verified: TLSA 3 1 1' / PASS line" "$mp"
        elif [[ -z "$pt_key" || "$pt_key" != "$mp_key" || "$pt_key" != "$tlsa" ]]; then
            fail "$name" "keys differ: posttls-finger ${pt_key:-?}, moat probe ${mp_key:-?}, published $tlsa" "$pt" "$mp"
        else
            pass "$name"
        fi
    else
        name="posttls-finger and moat probe --dane agree: $host (wrong TLSA) fails DANE (same key seen)"
        if ! grep -qE "posttls-finger: server certificate verification failed for $host\[[0-9.]+\]:25: num=[0-9]+:no matching DANE TLSA records" "$pt" \
           || ! grep -qE "posttls-finger: Untrusted TLS connection established to $host\[" "$pt" \
           || grep -qE "posttls-finger: (Verified|Trusted) TLS connection" "$pt"; then
            fail "$name" "posttls-finger did not say 'no matching DANE TLSA records' and 'Untrusted TLS connection'" "$pt"
        elif ((mrc != 1)) || ! grep -qE "^  tlsa +3 1 1 $WRONG_TLSA \(matches nothing presented\)\$" "$mp" \
             || ! grep -qE "^FAIL  DANE: TLSA 3 1 1 $WRONG_TLSA matches none of the certificates the server presented .*\(4\.7\.323\)\$" "$mp" \
             || grep -q '^PASS' "$mp"; then
            fail "$name" "moat probe exit $mrc (want 1), or no '(matches nothing presented)' / 'FAIL  DANE: ... (4.7.323)'" "$mp"
        elif [[ -z "$pt_key" || "$pt_key" != "$mp_key" ]]; then
            fail "$name" "keys differ: posttls-finger ${pt_key:-?}, moat probe ${mp_key:-?}" "$pt" "$mp"
        else
            pass "$name"
        fi
    fi
done

# moat check --dane, both ways of validating: the MX records' DNSSEC state and each host's verdict.
for how in unbound knot; do
    if [[ $how == unbound ]]; then
        args=(--nameserver "$UNB_IP:53" --resolver-validates)
        shown="through Unbound (--resolver-validates)"
    else
        args=(--nameserver "$KNOT_IP:53" --trust-anchor "$W/anchor.keys")
        shown="in-process against Knot (--trust-anchor)"
    fi
    for d in pf-good pf-bad; do
        o="$W/moat-check-$how-$d.out"
        timeout 60 "$MOAT" check "$d.dane.test" --dane "${args[@]}" --timeout 5 >"$o" 2>&1 || true
    done
    name="moat check --dane $shown: pf-good PASS dnssec + PASS dane verified 3 1 1; pf-bad FAIL dane (4.7.323)"
    if grep -qE '^PASS  dnssec +the MX records of pf-good\.dane\.test are DNSSEC-signed and validate$' "$W/moat-check-$how-pf-good.out" \
       && grep -qE "^PASS  dane +mx\.pf-good\.dane\.test: verified: TLSA 3 1 1 $PF_TLSA matches the server's certificate\$" "$W/moat-check-$how-pf-good.out" \
       && grep -qE '^PASS  dnssec +the MX records of pf-bad\.dane\.test are DNSSEC-signed and validate$' "$W/moat-check-$how-pf-bad.out" \
       && grep -qE "^FAIL  dane +mx\.pf-bad\.dane\.test: TLSA 3 1 1 $WRONG_TLSA matches none of the certificates .*\(4\.7\.323\)" "$W/moat-check-$how-pf-bad.out" \
       && ! grep -qE '^PASS  dane' "$W/moat-check-$how-pf-bad.out"; then
        pass "$name"
    else
        fail "$name" "missing dnssec/dane verdict lines" "$W/moat-check-$how-pf-good.out" "$W/moat-check-$how-pf-bad.out"
    fi
done

# ---------------------------------------------------------------------------------------------
# 13. Summary
# ---------------------------------------------------------------------------------------------
for spec in "Moat receiver:$MRX_PID:$W/moat-rx.log" "Moat sender a:$MTXA_PID:$W/moat-tx-a.log" \
            "Moat sender b:$MTXB_PID:$W/moat-tx-b.log" "knotd:$KNOT_PID:$K/knot.log" "unbound:$UNB_PID:$U/unbound.log"; do
    IFS=: read -r who pid file <<<"$spec"
    if alive "$pid"; then
        pass "$who stayed up for the whole suite"
    else
        fail "$who stayed up for the whole suite" "the process exited" "$file"
    fi
done
if ((FAILED > 0)); then
    printf 'failed checks:\n'
    printf '  - %s\n' "${FAILED_NAMES[@]}"
fi
echo "run time: $(($(date +%s) - START)) s"
echo "interop: $PASSED passed, $FAILED failed"
((FAILED == 0))
