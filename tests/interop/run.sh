#!/usr/bin/env bash
# Interop suite: Moat against real third-party software (swaks, OpenSSL s_client, Python's
# ssl module, Postfix as a sending MTA, testssl.sh), and Moat as a sender: a second Moat
# relays to a real Postfix receiver (TLS policy verify/may/encrypt, DSN, SMTP smuggling).
# `moat probe` and `moat sts check` run against Postfix with good, wrong-name and expired
# certificates, without TLS and against a closed port, with a Knot DNS server and an nginx
# MTA-STS policy host.
#
# Runs on a fresh Debian 12 machine as root: installs what it needs (apt), builds nothing but
# the moat binary if it is missing, uses only 127.0.0.x addresses, cleans up after itself.
#
#   MOAT_BIN=/path/to/moat tests/interop/run.sh
#
# Ends with one line `interop: N passed, M failed` and exits non-zero when M > 0.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
MOAT="${MOAT_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/debug/moat}"
IP=127.0.0.9
P_SMTP=2525
P_SMTPS=2465
P_SUB=2587
START=$(date +%s)

log() { printf '== %s\n' "$*"; }

# ---------------------------------------------------------------------------------------------
# 1. Dependencies
# ---------------------------------------------------------------------------------------------
need_pkgs=()
for p in postfix swaks libnet-ssleay-perl libio-socket-ssl-perl libauthen-sasl-perl openssl \
         testssl.sh procps iproute2 bsdextrautils bsdutils python3 ca-certificates knot nginx-light; do
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
TESTSSL=$(command -v testssl.sh || command -v testssl || true)
for tool in swaks openssl python3 script knotd nginx ss ps; do
    command -v "$tool" >/dev/null || { echo "interop: required tool $tool is missing after install" >&2; exit 2; }
done
[[ -n "$TESTSSL" ]] || { echo "interop: testssl.sh is missing after install" >&2; exit 2; }
[[ -x /usr/sbin/postfix && -x /usr/sbin/sendmail ]] || { echo "interop: postfix is missing after install" >&2; exit 2; }
perl -MIO::Socket::SSL -MNet::SSLeay -MAuthen::SASL -e 1 || { echo "interop: swaks TLS/SASL perl modules missing" >&2; exit 2; }

if [[ ! -x "$MOAT" ]]; then
    if [[ -z "${MOAT_BIN:-}" ]]; then
        log "building moat (debug)"
        (cd "$REPO" && cargo build --quiet)
    fi
    [[ -x "$MOAT" ]] || { echo "interop: moat binary not found at $MOAT" >&2; exit 2; }
fi

# ---------------------------------------------------------------------------------------------
# 2. Work dir and cleanup
# ---------------------------------------------------------------------------------------------
W=$(mktemp -d /tmp/moat-interop.XXXXXX)
chmod 755 "$W"   # Postfix daemons run as the postfix user and must reach their queue under $W
MOAT_PID=""
MOAT2_PID=""      # second Moat: the sender toward the Postfix receiver (section 4e)
PF_DIR="$W/postfix/etc"
PF_STARTED=0
PR_DIR="$W/postfix-rx/etc"
PR_STARTED=0
PS_DIR="$W/postfix-sts/etc"   # Postfix for moat probe / moat sts check (section 4g)
PS_STARTED=0
KNOT_PID=""
NGINX_PID=""

# stop_moat PID: SIGTERM, wait up to 5 s, then SIGKILL (also used for knotd and nginx).
stop_moat() {
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
    postfix -c "$dir" stop >/dev/null 2>&1
    mpid=$(cat "$queue/pid/master.pid" 2>/dev/null | tr -d ' ')
    if [[ -n "$mpid" ]]; then
        for _ in $(seq 50); do kill -0 "$mpid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$mpid" 2>/dev/null
    fi
}

cleanup() {
    local rc=$?
    set +e
    stop_moat "$MOAT_PID"
    stop_moat "$MOAT2_PID"
    ((PF_STARTED)) && stop_postfix "$PF_DIR" "$W/postfix/queue"
    ((PR_STARTED)) && stop_postfix "$PR_DIR" "$W/postfix-rx/queue"
    ((PS_STARTED)) && stop_postfix "$PS_DIR" "$W/postfix-sts/queue"
    stop_moat "$KNOT_PID"
    stop_moat "$NGINX_PID"
    if [[ -n "${INTEROP_KEEP:-}" ]]; then
        echo "interop: work dir kept: $W" >&2
    else
        rm -rf "$W"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
# Check bookkeeping
# ---------------------------------------------------------------------------------------------
PASSED=0
FAILED=0
FAILED_NAMES=()
pass() { PASSED=$((PASSED + 1)); printf 'PASS  %s\n' "$1"; }
# fail NAME REASON [FILE...]: prints the reason and the files as evidence.
fail() {
    local name=$1 reason=$2
    shift 2
    FAILED=$((FAILED + 1))
    FAILED_NAMES+=("$name")
    printf 'FAIL  %s: %s\n' "$name" "$reason"
    local f
    for f in "$@"; do
        printf -- '  ---- evidence: %s ----\n' "$(basename "$f")"
        if [[ -f "$f" ]]; then sed 's/^/  | /' "$f" | tail -n 80; else printf '  | %s\n' "$f"; fi
    done
}

# Waits up to $2 seconds for a file under dir $1 containing $3; prints its path.
wait_for_mail() {
    local dir=$1 secs=$2 token=$3 f
    local end=$((SECONDS + secs))
    while ((SECONDS < end)); do
        if [[ -d "$dir" ]]; then
            f=$(grep -rl -- "$token" "$dir" 2>/dev/null | head -n 1 || true)
            [[ -n "$f" ]] && { echo "$f"; return 0; }
        fi
        sleep 0.2
    done
    return 1
}

# Readiness. A port that answers may belong to another process on this machine (another run
# of this script, a system Postfix or nginx), so nothing here connects to see whether a server
# is up: Moat is waited for by its own "moat: ready (pid N)" line, the other servers by `ss`
# naming their own pid as the owner of the listening socket. Each wait ends at once, with the
# reason, when the server exits or another process holds the address.

# alive PID: the process exists and is not a zombie.
alive() {
    local st
    st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ -n "$st" && "$st" != Z* ]]
}

# moat_exit_reason LOG: why a Moat that exited before it was ready stopped, from its log.
moat_exit_reason() {
    local line addr
    line=$(grep -m 1 'cannot listen on ' "$1" 2>/dev/null || true)
    if [[ -z "$line" ]]; then
        echo "it never printed its ready line (see its log)"
        return
    fi
    addr=${line#*cannot listen on }
    addr=${addr%% *}
    if [[ "$line" == *"in use"* ]]; then
        echo "address in use: another process already listens on $addr"
    else
        echo "$line"
    fi
}

# wait_moat_ready NAME PID LOG SECS ADDR...: waits for "moat: ready (pid PID)" in LOG (the
# server's own stdout and stderr), then checks that it reported listening on each ADDR. On
# failure prints why and the tail of LOG to stderr and returns 1 (at once if PID exits).
wait_moat_ready() {
    local name=$1 pid=$2 log=$3 secs=$4
    shift 4
    local end=$((SECONDS + secs)) ready=0 a
    while ((SECONDS < end)); do
        if grep -qxF "moat: ready (pid $pid)" "$log" 2>/dev/null; then ready=1; break; fi
        if ! alive "$pid"; then
            echo "interop: $name (pid $pid) exited before it was ready: $(moat_exit_reason "$log")" >&2
            tail -n 40 "$log" >&2
            return 1
        fi
        sleep 0.1
    done
    if ((!ready)); then
        echo "interop: $name (pid $pid) did not print its ready line within $secs s" >&2
        tail -n 40 "$log" >&2
        return 1
    fi
    for a in "$@"; do
        if ! grep -qF "moat: listening on $a (" "$log"; then
            echo "interop: $name (pid $pid) is ready but did not report listening on $a" >&2
            tail -n 40 "$log" >&2
            return 1
        fi
    done
}

# wait_listener NAME PID tcp|udp HOST:PORT SECS: waits until every socket listening on
# HOST:PORT belongs to process PID (ss lists a socket's owners; a pre-forked server's workers
# share the line with PID). Prints why to stderr and returns 1 at once when PID exits or
# another process holds the address, and after SECS.
wait_listener() {
    local name=$1 pid=$2 proto=$3 hp=$4 secs=$5 flags=-Hltnp owners
    [[ "$proto" == udp ]] && flags=-Hlunp
    local end=$((SECONDS + secs))
    while ((SECONDS < end)); do
        owners=$(ss "$flags" src "$hp" 2>/dev/null || true)
        if [[ -n "$owners" ]]; then
            if ! grep -vqF "pid=$pid," <<<"$owners"; then return 0; fi
            echo "interop: address in use: another process already listens on $hp ($proto), not $name (pid $pid):" >&2
            printf '  %s\n' "$owners" >&2
            return 1
        fi
        if ! alive "$pid"; then
            echo "interop: $name (pid $pid) exited before it listened on $hp ($proto)" >&2
            return 1
        fi
        sleep 0.1
    done
    echo "interop: $name (pid $pid) did not listen on $hp ($proto) within $secs s" >&2
    return 1
}

# postfix_master QUEUE_DIR: the pid of the Postfix master of the instance with that queue.
postfix_master() {
    tr -d ' \n' <"$1/pid/master.pid" 2>/dev/null || true
}

# ---------------------------------------------------------------------------------------------
# 3. CA, certificate, Moat config, user, server
# ---------------------------------------------------------------------------------------------
log "work dir $W"
cd "$W"
{
    openssl ecparam -name prime256v1 -genkey -noout -out ca.key
    openssl req -new -x509 -key ca.key -sha256 -days 2 -subj "/CN=Moat Interop Test CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out ca.crt
    openssl ecparam -name prime256v1 -genkey -noout -out server.key
    openssl req -new -key server.key -subj "/CN=mx.moat.test" -out server.csr
    printf '%s\n' "subjectAltName=DNS:mx.moat.test" "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" > server.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days 2 \
        -extfile server.ext -out server.crt
    # Certificate of the Postfix receiver that Moat sends to (section 4e).
    openssl ecparam -name prime256v1 -genkey -noout -out pf-mx.key
    openssl req -new -key pf-mx.key -subj "/CN=mx.postfix.test" -out pf-mx.csr
    printf '%s\n' "subjectAltName=DNS:mx.postfix.test" "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" > pf-mx.ext
    openssl x509 -req -in pf-mx.csr -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days 2 \
        -extfile pf-mx.ext -out pf-mx.crt
} >"$W/openssl-ca.log" 2>&1 || { cat "$W/openssl-ca.log"; echo "interop: making the test CA failed" >&2; exit 2; }
chmod 644 ca.crt server.crt pf-mx.crt

DATA="$W/moat-data"
CFG="$W/moat.toml"
cat >"$CFG" <<EOF
hostname = "mx.moat.test"
data_dir = "$DATA"

[[listener]]
name = "smtp"
address = "$IP:$P_SMTP"
mode = "smtp"

[[listener]]
name = "smtps"
address = "$IP:$P_SMTPS"
mode = "smtps"

[[listener]]
name = "submission"
address = "$IP:$P_SUB"
mode = "submission"

[[tls.certificate]]
cert = "$W/server.crt"
key = "$W/server.key"

[limits]
auth_failure_delay_ms = 0

[[domain]]
name = "moat.test"
route = "maildir"
EOF

if "$MOAT" config check "$CFG" >"$W/config-check.out" 2>&1 && grep -q ': OK' "$W/config-check.out"; then
    pass "moat config check accepts the interop config"
else
    fail "moat config check accepts the interop config" "config check did not say OK" "$W/config-check.out"
fi

if ! echo pw | "$MOAT" user add alice --config "$CFG" >"$W/user-add.out" 2>&1; then
    cat "$W/user-add.out"
    echo "interop: moat user add failed" >&2
    exit 2
fi

"$MOAT" serve --config "$CFG" >"$W/moat.log" 2>&1 &
MOAT_PID=$!
wait_moat_ready moat "$MOAT_PID" "$W/moat.log" 20 "$IP:$P_SMTP" "$IP:$P_SMTPS" "$IP:$P_SUB" || exit 2
log "moat is up (pid $MOAT_PID)"

# Python helper for raw dialogs.
cat >"$W/smtpraw.py" <<'PYEOF'
import base64, socket, ssl, sys, time

def read_reply(f, out):
    """Reads one (possibly multi-line) SMTP reply; returns its lines."""
    lines = []
    while True:
        line = f.readline()
        if not line:
            break
        s = line.decode("utf-8", "replace").rstrip("\r\n")
        out.write("S: " + s + "\n")
        lines.append(s)
        if len(s) < 4 or s[3] != "-":
            break
    return lines

def auth_plaintext(host, port):
    """AUTH PLAIN in the clear: the server must refuse with 538 without looking at it."""
    out = sys.stdout
    sock = socket.create_connection((host, port), timeout=10)
    f = sock.makefile("rb")
    read_reply(f, out)
    for cmd in ["EHLO client.example",
                "AUTH PLAIN " + base64.b64encode(b"\0alice\0pw").decode(),
                "QUIT"]:
        out.write("C: " + cmd + "\n")
        sock.sendall((cmd + "\r\n").encode())
        r = read_reply(f, out)
        if cmd.startswith("AUTH"):
            code = r[-1][:3] if r else "---"
    sock.close()
    return 0 if code == "538" else 1

def starttls_injection(host, port, cafile, sni):
    """CVE-2011-0411: plaintext pipelined after STARTTLS must not be executed inside TLS."""
    out = sys.stdout
    sock = socket.create_connection((host, port), timeout=10)
    f = sock.makefile("rb")
    read_reply(f, out)
    out.write("C: EHLO client.example\n")
    sock.sendall(b"EHLO client.example\r\n")
    read_reply(f, out)
    out.write("C: STARTTLS\\r\\nRSET\\r\\n   (one write)\n")
    sock.sendall(b"STARTTLS\r\nRSET\r\n")
    # Read the STARTTLS reply byte by byte so that no TLS data is swallowed by a buffer.
    buf = b""
    while not buf.endswith(b"\r\n"):
        c = sock.recv(1)
        if not c:
            out.write("server closed the connection before answering STARTTLS\n")
            return 1
        buf += c
    out.write("S: " + buf.decode("utf-8", "replace").rstrip() + "\n")
    if not buf.startswith(b"220"):
        out.write("STARTTLS was refused; cannot test injection\n")
        return 1
    ctx = ssl.create_default_context(cafile=cafile)
    try:
        tls = ctx.wrap_socket(sock, server_hostname=sni)
    except (ssl.SSLError, OSError) as e:
        # A server that detects the injection and drops the connection is also safe.
        out.write("TLS handshake ended by server after injected data: %r (safe)\n" % (e,))
        return 0
    out.write("TLS established: %s %s\n" % (tls.version(), tls.cipher()[0]))
    out.write("C: EHLO client.example (inside TLS)\n")
    tls.sendall(b"EHLO client.example\r\n")
    tf = tls.makefile("rb")
    first = read_reply(tf, out)
    # Anything further within a second is a reply to a command we did not send inside TLS.
    tls.settimeout(1.0)
    extra = b""
    try:
        while True:
            d = tls.recv(4096)
            if not d:
                break
            extra += d
    except (socket.timeout, TimeoutError):
        pass
    except (ssl.SSLError, OSError):
        pass
    if extra:
        out.write("EXTRA after EHLO reply: %r\n" % extra)
    ok = bool(first) and first[0].startswith("250") and "mx.moat.test" in first[0] and len(first) > 1 and not extra
    if not first:
        out.write("server closed the TLS session without answering EHLO\n")
    try:
        tls.sendall(b"QUIT\r\n")
        tls.settimeout(5)
        read_reply(tf, out)
        tls.close()
    except Exception:
        pass
    return 0 if ok else 1

if __name__ == "__main__":
    what = sys.argv[1]
    if what == "auth-plaintext":
        sys.exit(auth_plaintext(sys.argv[2], int(sys.argv[3])))
    if what == "starttls-injection":
        sys.exit(starttls_injection(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]))
    sys.exit(2)
PYEOF

SW=(swaks --server "$IP" --helo client.example --from sender@client.example --timeout 20)

# ---------------------------------------------------------------------------------------------
# 4a. swaks
# ---------------------------------------------------------------------------------------------
log "swaks checks"
name="swaks STARTTLS on :$P_SMTP delivers with ESMTPS + TLSv1.3 IANA cipher in Received"
tok="interop-starttls-$RANDOM$RANDOM"
rc=0
"${SW[@]}" --port $P_SMTP --tls --to bob@moat.test --header "Subject: $tok" >"$W/swaks-starttls.out" 2>&1 || rc=$?
if ((rc != 0)); then
    fail "$name" "swaks exited $rc" "$W/swaks-starttls.out"
elif ! f=$(wait_for_mail "$DATA/mail/bob/new" 15 "$tok"); then
    fail "$name" "no Maildir file with $tok under $DATA/mail/bob/new" "$W/swaks-starttls.out" "$W/moat.log"
elif ! grep -q '(Moat) with ESMTPS ' "$f" || ! grep -Eq '\(using TLSv1\.3 with cipher TLS_[A-Z0-9_]+ \([0-9]+/[0-9]+ bits\)' "$f"; then
    fail "$name" "Received header lacks 'with ESMTPS' or '(using TLSv1.3 with cipher TLS_...'" "$f"
else
    pass "$name"
fi

name="swaks implicit TLS (--tlsc) on :$P_SMTPS delivers with ESMTPS"
tok="interop-smtps-$RANDOM$RANDOM"
rc=0
"${SW[@]}" --port $P_SMTPS --tlsc --to bob@moat.test --header "Subject: $tok" >"$W/swaks-smtps.out" 2>&1 || rc=$?
if ((rc != 0)); then
    fail "$name" "swaks exited $rc" "$W/swaks-smtps.out"
elif ! f=$(wait_for_mail "$DATA/mail/bob/new" 15 "$tok"); then
    fail "$name" "no Maildir file with $tok" "$W/swaks-smtps.out" "$W/moat.log"
elif ! grep -q '(Moat) with ESMTPS ' "$f" || ! grep -q '(using TLSv1\.[23] with cipher TLS_' "$f"; then
    fail "$name" "Received header lacks ESMTPS / TLS details" "$f"
else
    pass "$name"
fi

for mech in PLAIN LOGIN; do
    name="submission :$P_SUB STARTTLS + AUTH $mech (alice) may relay to remote.example (250)"
    out="$W/swaks-sub-$mech.out"
    rc=0
    "${SW[@]}" --port $P_SUB --tls --auth $mech --auth-user alice --auth-password pw \
        --to x@remote.example --header "Subject: interop relay $mech" >"$out" 2>&1 || rc=$?
    if ((rc != 0)); then
        fail "$name" "swaks exited $rc" "$out"
    elif ! grep -Eq '^ *<[-~] +235[ -]' "$out"; then
        fail "$name" "no 235 for AUTH" "$out"
    elif ! grep -A1 -E '^ *[-~]> RCPT TO:<x@remote.example>' "$out" | grep -Eq '^ *<[-~] +250[ -]'; then
        fail "$name" "RCPT to remote.example was not answered 250" "$out"
    else
        pass "$name"
    fi

    name="submission :$P_SUB AUTH $mech with a wrong password gets 535"
    out="$W/swaks-sub-$mech-bad.out"
    rc=0
    "${SW[@]}" --port $P_SUB --tls --auth $mech --auth-user alice --auth-password wrong-pw \
        --to x@remote.example >"$out" 2>&1 || rc=$?
    if ((rc == 0)); then
        fail "$name" "swaks succeeded with a wrong password" "$out"
    elif ! grep -Eq '^ *<(\*\*|~\*) +535[ -]5\.7\.8' "$out"; then
        fail "$name" "no '535 5.7.8' reply to AUTH" "$out"
    else
        pass "$name"
    fi
done

name="AUTH PLAIN without TLS on :$P_SMTP gets 538 (raw socket)"
rc=0
python3 "$W/smtpraw.py" auth-plaintext "$IP" $P_SMTP >"$W/auth-plaintext.out" 2>&1 || rc=$?
if ((rc == 0)) && grep -Eq '^S: 538 5\.7\.11' "$W/auth-plaintext.out"; then
    pass "$name"
else
    fail "$name" "expected '538 5.7.11' to AUTH in the clear (helper rc=$rc)" "$W/auth-plaintext.out"
fi

name="relay denied: plaintext, no AUTH, RCPT x@remote.example on :$P_SMTP gets 554 5.7.1"
rc=0
"${SW[@]}" --port $P_SMTP --to x@remote.example >"$W/swaks-relay.out" 2>&1 || rc=$?
if ((rc != 0)) && grep -A1 -E '^ *[-~]> RCPT TO:<x@remote.example>' "$W/swaks-relay.out" | grep -Eq '^ *<(\*\*|~\*) +554[ -]5\.7\.1'; then
    pass "$name"
else
    fail "$name" "RCPT was not refused with 554 5.7.1 (swaks rc=$rc)" "$W/swaks-relay.out"
fi

name="require TLS: MAIL before STARTTLS on :$P_SUB gets 530 5.7.0"
rc=0
"${SW[@]}" --port $P_SUB --to bob@moat.test >"$W/swaks-requiretls.out" 2>&1 || rc=$?
if ((rc != 0)) && grep -A1 -E '^ *[-~]> MAIL FROM:' "$W/swaks-requiretls.out" | grep -Eq '^ *<(\*\*|~\*) +530[ -]5\.7\.0'; then
    pass "$name"
else
    fail "$name" "MAIL was not refused with 530 5.7.0 (swaks rc=$rc)" "$W/swaks-requiretls.out"
fi

# ---------------------------------------------------------------------------------------------
# 4b. OpenSSL s_client
# ---------------------------------------------------------------------------------------------
log "openssl s_client checks"
SC=(timeout 30 openssl s_client -starttls smtp -connect "$IP:$P_SMTP" -servername mx.moat.test -CAfile "$W/ca.crt")

name="openssl s_client STARTTLS: chain + name verify (code 0), TLSv1.3"
rc=0
"${SC[@]}" -verify_hostname mx.moat.test </dev/null >"$W/sclient-13.out" 2>&1 || rc=$?
if grep -q 'Verify return code: 0 (ok)' "$W/sclient-13.out" && grep -Eq 'New, TLSv1\.3, Cipher is TLS_|Protocol *: TLSv1\.3' "$W/sclient-13.out" \
   && grep -q 'subject=CN = mx.moat.test' "$W/sclient-13.out"; then
    pass "$name"
else
    fail "$name" "no 'Verify return code: 0' with TLSv1.3 (rc=$rc)" "$W/sclient-13.out"
fi

name="openssl s_client STARTTLS -tls1_2 works and verifies"
rc=0
"${SC[@]}" -tls1_2 -verify_hostname mx.moat.test </dev/null >"$W/sclient-12.out" 2>&1 || rc=$?
if grep -q 'Verify return code: 0 (ok)' "$W/sclient-12.out" && grep -Eq 'Protocol *: TLSv1\.2' "$W/sclient-12.out" \
   && grep -Eq 'Cipher *: ECDHE-' "$W/sclient-12.out"; then
    pass "$name"
else
    fail "$name" "TLS 1.2 handshake did not complete with a verified chain (rc=$rc)" "$W/sclient-12.out"
fi

# OpenSSL 3 refuses TLS 1.0/1.1 itself at security level >= 1; lower it so that the client really
# offers them and the refusal comes from the server.
for v in tls1_1 tls1; do
    name="openssl s_client STARTTLS -$v is refused by the server"
    out="$W/sclient-$v.out"
    rc=0
    "${SC[@]}" -"$v" -cipher 'DEFAULT:@SECLEVEL=0' </dev/null >"$out" 2>&1 || rc=$?
    if grep -Eq 'no protocols available|no ciphers available' "$out"; then
        fail "$name" "the client did not even offer $v (test is void)" "$out"
    elif ((rc != 0)) && grep -q 'Cipher is (NONE)' "$out" && grep -q 'no peer certificate available' "$out" \
         && grep -Eq 'alert protocol version|alert handshake failure|unsupported protocol|wrong version number|unexpected eof' "$out"; then
        pass "$name"
    else
        fail "$name" "handshake with $v was not refused (rc=$rc)" "$out"
    fi
done

# ---------------------------------------------------------------------------------------------
# 4c. STARTTLS command injection (CVE-2011-0411)
# ---------------------------------------------------------------------------------------------
log "STARTTLS injection check"
name="STARTTLS injection (CVE-2011-0411): pipelined RSET is not answered inside TLS"
rc=0
python3 "$W/smtpraw.py" starttls-injection "$IP" $P_SMTP "$W/ca.crt" mx.moat.test >"$W/injection.out" 2>&1 || rc=$?
if ((rc == 0)); then
    pass "$name"
else
    fail "$name" "server answered injected plaintext inside TLS, or the dialog failed (rc=$rc)" "$W/injection.out"
fi

# ---------------------------------------------------------------------------------------------
# 4d. Postfix as a sender
# ---------------------------------------------------------------------------------------------
log "Postfix sender checks"
PF="$W/postfix"
mkdir -p "$PF_DIR" "$PF/queue" "$PF/data" "$PF/log"
chown postfix "$PF/data"
chmod 755 "$PF" "$PF/log"
cat >"$PF_DIR/transport" <<EOF
moat.test                   smtp:[$IP]:$P_SMTP
pfverify@moat.test          moatverify:[$IP]:$P_SMTP
pfbadname@moat.test         moatbadname:[$IP]:$P_SMTP
EOF
chmod 644 "$PF_DIR/transport"
cat >"$PF_DIR/main.cf" <<EOF
compatibility_level = 3.6
config_directory = $PF_DIR
queue_directory = $PF/queue
data_directory = $PF/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = sender.client.example
mydomain = client.example
myorigin = \$myhostname
mydestination =
alias_maps =
alias_database =
local_recipient_maps =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost =
smtp_dns_support_level = disabled
maillog_file = $PF/log/maillog
maillog_file_prefixes = $PF/log
transport_maps = texthash:$PF_DIR/transport
smtp_tls_security_level = encrypt
smtp_tls_CAfile = $W/ca.crt
smtp_tls_loglevel = 1
smtp_tls_session_cache_database =
smtp_connection_cache_on_demand = no
queue_run_delay = 10s
minimal_backoff_time = 10s
maximal_backoff_time = 20s
EOF
cat >"$PF_DIR/master.cf" <<'EOF'
pickup      unix  n       -       n       60      1       pickup
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
  -o syslog_name=postfix-encrypt
moatverify  unix  -       -       n       -       -       smtp
  -o syslog_name=postfix-verify
  -o smtp_tls_security_level=verify
  -o smtp_tls_verify_cert_match=mx.moat.test
moatbadname unix  -       -       n       -       -       smtp
  -o syslog_name=postfix-badname
  -o smtp_tls_security_level=verify
  -o smtp_tls_verify_cert_match=wrong.moat.test
EOF

pf_ok=1
rc=0
script -qec "postfix -c $PF_DIR check" /dev/null >"$W/postfix-check.out" 2>&1 || rc=$?
if ((rc != 0)); then
    pf_ok=0
    fail "Postfix instance starts" "postfix check failed (rc=$rc)" "$W/postfix-check.out"
else
    rc=0
    PF_STARTED=1
    script -qec "postfix -c $PF_DIR start" /dev/null >"$W/postfix-start.out" 2>&1 || rc=$?
    # `postfix start` waits for the master's initialisation (master -w); its pid file then names
    # the master of this instance, which must still run.
    if ((rc != 0)); then
        pf_ok=0
        fail "Postfix instance starts" "postfix start failed (rc=$rc)" "$W/postfix-start.out" "$PF/log/maillog"
    elif ! alive "$(postfix_master "$PF/queue")"; then
        pf_ok=0
        fail "Postfix instance starts" "no running master for $PF_DIR after postfix start" "$W/postfix-start.out" "$PF/log/maillog"
    fi
fi

# pf_send RCPT TOKEN: injects a message through Postfix's sendmail and flushes the queue.
pf_send() {
    local rcpt=$1 tok=$2
    printf 'From: Postfix Sender <pfsender@client.example>\nTo: <%s>\nSubject: %s\n\nSent by Postfix to Moat (%s).\n' \
        "$rcpt" "$tok" "$tok" | sendmail -C "$PF_DIR" -f pfsender@client.example -- "$rcpt"
    postqueue -c "$PF_DIR" -f >/dev/null 2>&1 || true
}

# Queue id Postfix gave the message carrying TOKEN (from the cleanup log line).
pf_queue_id() {
    local tok=$1 end=$((SECONDS + 15)) id
    while ((SECONDS < end)); do
        id=$(grep -F "$tok" "$PF/log/maillog" 2>/dev/null | grep -oE ' [0-9A-F]{6,}: ' | head -n 1 | tr -d ' :' || true)
        [[ -n "$id" ]] && { echo "$id"; return 0; }
        sleep 0.2
    done
    return 1
}

if ((pf_ok)); then
    # The header_checks-free way to map a token to a queue id: Message-ID is logged by cleanup.
    for run in encrypt verify; do
        if [[ $run == encrypt ]]; then rcpt=pfencrypt@moat.test; else rcpt=pfverify@moat.test; fi
        name="Postfix (smtp_tls_security_level=$run) -> Moat :$P_SMTP lands in Maildir with ESMTPS"
        tok="interop-postfix-$run-$RANDOM$RANDOM"
        rc=0
        pf_send "$rcpt" "$tok" 2>"$W/pf-send-$run.err" || rc=$?
        mbox=${rcpt%@*}
        if ((rc != 0)); then
            fail "$name" "sendmail -C exited $rc" "$W/pf-send-$run.err" "$PF/log/maillog"
            continue
        fi
        if ! f=$(wait_for_mail "$DATA/mail/$mbox/new" 30 "$tok"); then
            fail "$name" "no Maildir file with $tok" "$PF/log/maillog" "$W/moat.log"
            continue
        fi
        if grep -q '(Moat) with ESMTPS ' "$f" && grep -q '(using TLSv1\.[23] with cipher TLS_' "$f" \
           && grep -q 'by sender.client.example (Postfix' "$f"; then
            pass "$name"
        else
            fail "$name" "delivered file lacks Postfix's and Moat's ESMTPS Received headers" "$f"
        fi
        # Postfix's own log must tell how the TLS peer was authenticated.
        name="Postfix ($run) log: TLS connection to Moat established and status=sent"
        if [[ $run == encrypt ]]; then want='(Trusted|Untrusted|Anonymous|Verified) TLS connection established to [^ ]*\[127\.0\.0\.9\]:2525'; else want='Verified TLS connection established to [^ ]*\[127\.0\.0\.9\]:2525'; fi
        end=$((SECONDS + 10)); ok=0
        while ((SECONDS < end)); do
            if grep -E "postfix-$run/smtp\[[0-9]+\]: $want" "$PF/log/maillog" >/dev/null 2>&1 \
               && grep -E "postfix-$run/smtp\[[0-9]+\]: [0-9A-F]+: to=<$rcpt>.*status=sent" "$PF/log/maillog" >/dev/null 2>&1; then
                ok=1; break
            fi
            sleep 0.2
        done
        if ((ok)); then
            pass "$name"
        else
            fail "$name" "expected /$want/ and status=sent from postfix-$run/smtp" "$PF/log/maillog"
        fi
    done

    # Negative control: the same verify transport with a name the certificate does not carry
    # must refuse to deliver. This shows that the verify run above really checked the name.
    name="Postfix verify with match=wrong.moat.test defers (cert name is checked)"
    tok="interop-postfix-badname-$RANDOM$RANDOM"
    rcpt=pfbadname@moat.test
    rc=0
    pf_send "$rcpt" "$tok" 2>"$W/pf-send-badname.err" || rc=$?
    end=$((SECONDS + 20)); ok=0
    while ((rc == 0 && SECONDS < end)); do
        if grep -E "postfix-badname/smtp\[[0-9]+\]: [0-9A-F]+: to=<$rcpt>.*status=deferred.*(not verified|verification failed|certificate)" "$PF/log/maillog" >/dev/null 2>&1; then
            ok=1; break
        fi
        sleep 0.2
    done
    sleep 0.5
    if ((ok)) && ! grep -rqs -- "$tok" "$DATA/mail"; then
        pass "$name"
    else
        fail "$name" "message was not deferred for the name mismatch (or was delivered; rc=$rc)" "$PF/log/maillog"
    fi
fi

# ---------------------------------------------------------------------------------------------
# 4e. Moat as a sender: a second Moat relays to a real Postfix receiver
# ---------------------------------------------------------------------------------------------
# Postfix receiver (own config dir):
#   127.0.0.31:2526  STARTTLS (may) with a certificate for mx.postfix.test from the test CA
#   127.0.0.32:2526  no TLS; Postfix 3.7 defaults (lenient about bare LF: a useful downstream
#                    to show that Moat never relays an SMTP smuggling sequence); CHUNKING is
#                    not offered so that Moat must use DATA and dot-stuffing.
# Every domain below lands in a Maildir under $PR/vmail/<domain>/ (victim@postfix.test in
# $PR/vmail/victim/). The second Moat (127.0.0.10) routes by `relay` with per-domain TLS policy.
log "Moat -> Postfix receiver checks"
PR="$W/postfix-rx"
PR_RX_TLS=127.0.0.31
PR_RX_PLAIN=127.0.0.32
PR_PORT=2526
IP2=127.0.0.10
P2_SMTP=2525
P2_NORM=2526
DATA2="$W/moat2-data"
CFG2="$W/moat2.toml"
mkdir -p "$PR_DIR" "$PR/queue" "$PR/data" "$PR/log" "$PR/vmail"
chown postfix "$PR/data"
chown "$(id -u nobody):$(id -g nobody)" "$PR/vmail"
chmod 755 "$PR" "$PR/log" "$PR/vmail"
cat >"$PR_DIR/vmailbox" <<'EOF'
victim@postfix.test     victim/
@postfix.test           postfix.test/
@plain.test             plain.test/
@secure-plain.test      secure-plain.test/
@badname.test           badname.test/
EOF
chmod 644 "$PR_DIR/vmailbox"
cat >"$PR_DIR/main.cf" <<EOF
compatibility_level = 3.6
config_directory = $PR_DIR
queue_directory = $PR/queue
data_directory = $PR/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.postfix.test
mydomain = postfix.test
myorigin = \$myhostname
mydestination =
alias_maps =
alias_database =
local_recipient_maps =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost =
smtp_dns_support_level = disabled
maillog_file = $PR/log/maillog
maillog_file_prefixes = $PR/log
virtual_mailbox_domains = postfix.test plain.test secure-plain.test badname.test
virtual_mailbox_base = $PR/vmail
virtual_mailbox_maps = texthash:$PR_DIR/vmailbox
virtual_uid_maps = static:$(id -u nobody)
virtual_gid_maps = static:$(id -g nobody)
smtpd_tls_security_level = may
smtpd_tls_cert_file = $W/pf-mx.crt
smtpd_tls_key_file = $W/pf-mx.key
smtpd_tls_received_header = yes
smtpd_tls_loglevel = 1
smtpd_tls_session_cache_database =
smtpd_peername_lookup = no
bounce_queue_lifetime = 0
EOF
cat >"$PR_DIR/master.cf" <<EOF
$PR_RX_TLS:$PR_PORT inet n - n - - smtpd
  -o syslog_name=postfix-rx-tls
$PR_RX_PLAIN:$PR_PORT inet n - n - - smtpd
  -o syslog_name=postfix-rx-plain
  -o smtpd_tls_security_level=none
  -o smtpd_discard_ehlo_keywords=chunking
pickup      unix  n       -       n       60      1       pickup
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
virtual     unix  -       n       n       -       -       virtual
EOF

cat >"$CFG2" <<EOF
hostname = "out.moat.test"
data_dir = "$DATA2"

[[listener]]
name = "smtp"
address = "$IP2:$P2_SMTP"
mode = "smtp"

[[listener]]
name = "smtp-normalize"
address = "$IP2:$P2_NORM"
mode = "smtp"
bare_newline = "normalize"

[[tls.certificate]]
cert = "$W/server.crt"
key = "$W/server.key"

[relay]
trusted_networks = ["127.0.0.0/8"]

[[domain]]
name = "moat.test"
route = "maildir"

[[domain]]
name = "postfix.test"
route = "relay"
relay = "$PR_RX_TLS:$PR_PORT"

[[domain]]
name = "badname.test"
route = "relay"
relay = "$PR_RX_TLS:$PR_PORT"

[[domain]]
name = "plain.test"
route = "relay"
relay = "$PR_RX_PLAIN:$PR_PORT"

[[domain]]
name = "secure-plain.test"
route = "relay"
relay = "$PR_RX_PLAIN:$PR_PORT"

[[tls_policy]]
domains = ["postfix.test"]
level = "verify"
ca_file = "$W/ca.crt"
match_names = ["mx.postfix.test"]

# Negative control for the verify check: same server, a name its certificate does not carry.
[[tls_policy]]
domains = ["badname.test"]
level = "verify"
ca_file = "$W/ca.crt"
match_names = ["wrong.postfix.test"]

[[tls_policy]]
domains = ["secure-plain.test"]
level = "encrypt"

[queue]
retry_schedule_secs = [1]
security_lifetime_secs = 3
max_lifetime_secs = 3

[outbound]
connect_timeout_secs = 5
EOF

rx_ok=1
rc=0
script -qec "postfix -c $PR_DIR check" /dev/null >"$W/postfix-rx-check.out" 2>&1 || rc=$?
if ((rc != 0)); then
    rx_ok=0
    fail "Postfix receiver and sending Moat start" "postfix check failed (rc=$rc)" "$W/postfix-rx-check.out"
else
    rc=0
    PR_STARTED=1
    script -qec "postfix -c $PR_DIR start" /dev/null >"$W/postfix-rx-start.out" 2>&1 || rc=$?
    pr_pid=$(postfix_master "$PR/queue")
    if ((rc != 0)) || [[ -z "$pr_pid" ]] \
        || ! wait_listener "Postfix receiver" "$pr_pid" tcp "$PR_RX_TLS:$PR_PORT" 20 2>"$W/postfix-rx-listen.err" \
        || ! wait_listener "Postfix receiver" "$pr_pid" tcp "$PR_RX_PLAIN:$PR_PORT" 20 2>>"$W/postfix-rx-listen.err"; then
        rx_ok=0
        why=$(grep -m 1 -o 'fatal: bind .*' "$PR/log/maillog" 2>/dev/null || true)
        [[ "$why" == *"in use"* ]] && why="address in use: another process already listens there ($why)"
        fail "Postfix receiver and sending Moat start" "postfix start failed or its master (pid ${pr_pid:-none}) does not listen (rc=$rc)${why:+: $why}" \
            "$W/postfix-rx-listen.err" "$W/postfix-rx-start.out" "$PR/log/maillog"
    fi
fi
if ((rx_ok)); then
    rc=0
    "$MOAT" config check "$CFG2" >"$W/moat2-config-check.out" 2>&1 || rc=$?
    if ((rc != 0)) || ! grep -q ': OK' "$W/moat2-config-check.out"; then
        rx_ok=0
        fail "Postfix receiver and sending Moat start" "moat config check of the sender config failed" "$W/moat2-config-check.out"
    else
        "$MOAT" serve --config "$CFG2" >"$W/moat2.log" 2>&1 &
        MOAT2_PID=$!
        if ! wait_moat_ready "sending moat" "$MOAT2_PID" "$W/moat2.log" 20 "$IP2:$P2_SMTP" "$IP2:$P2_NORM" \
            2>"$W/moat2-ready.err"; then
            rx_ok=0
            fail "Postfix receiver and sending Moat start" "sending Moat is not ready: $(head -n 1 "$W/moat2-ready.err")" \
                "$W/moat2-ready.err"
        fi
    fi
fi

# Raw-bytes SMTP smuggling client: one DATA whose content carries an end-of-data look-alike
# followed by a second transaction for VICTIM (default victim@postfix.test).
#   smuggle.py HOST PORT lf|crlf-lf|lf-crlf RCPT TOKEN [VICTIM]
cat >"$W/smuggle.py" <<'PYEOF'
import socket, sys

SEQS = {"lf": b"\n.\n", "crlf-lf": b"\r\n.\n", "lf-crlf": b"\n.\r\n"}

def reply(f, out):
    lines = []
    while True:
        line = f.readline()
        if not line:
            break
        s = line.decode("utf-8", "replace").rstrip("\r\n")
        out.write("S: " + s + "\n")
        lines.append(s)
        if len(s) < 4 or s[3] != "-":
            break
    return lines[-1][:3] if lines else "---"

def main(host, port, variant, rcpt, tok, victim):
    out = sys.stdout
    sock = socket.create_connection((host, port), timeout=20)
    f = sock.makefile("rb")
    reply(f, out)
    for cmd in ["EHLO client.example", "MAIL FROM:<alice@moat.test>", "RCPT TO:<%s>" % rcpt, "DATA"]:
        out.write("C: " + cmd + "\n")
        sock.sendall((cmd + "\r\n").encode())
        code = reply(f, out)
    if code != "354":
        return 1
    body = (b"From: <alice@moat.test>\r\nTo: <" + rcpt.encode() + b">\r\nSubject: " + tok.encode()
            + b"\r\nMessage-Id: <" + tok.encode() + b"@moat.test>\r\n\r\nfirst part"
            + SEQS[variant]
            + b"MAIL FROM:<attacker@evil.example>\r\nRCPT TO:<" + victim.encode() + b">\r\nDATA\r\n"
            + b"From: <ceo@postfix.test>\r\nSubject: smuggled " + tok.encode() + b"\r\n\r\nsmuggled body\r\n.\r\n")
    out.write("C: %r   (one write)\n" % body)
    sock.sendall(body)
    codes = [reply(f, out)]
    out.write("C: QUIT\n")
    sock.sendall(b"QUIT\r\n")
    sock.settimeout(5)
    try:
        while True:
            c = reply(f, out)
            if c == "---":
                break
            codes.append(c)
    except (socket.timeout, OSError):
        pass
    sock.close()
    # Anything between the 250 and the 221 (another 250, a 354 ...) means Moat itself executed
    # the smuggled commands.
    out.write("replies after the content: %s\n" % " ".join(codes))
    return 0 if codes == ["250", "221"] else 1

if __name__ == "__main__":
    victim = sys.argv[6] if len(sys.argv) > 6 else "victim@postfix.test"
    sys.exit(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], victim))
PYEOF

# Postfix session that received the message with Message-Id <TOKEN@moat.test>: the queue ids
# it created, their recipients and the disconnect line with the command counts.
cat >"$W/pf-session.py" <<'PYEOF'
import re, sys
log, tok = sys.argv[1], sys.argv[2]
lines = open(log, errors="replace").read().splitlines()
qid = None
for l in lines:
    m = re.search(r"cleanup\[\d+\]: ([0-9A-F]+): message-id=<" + re.escape(tok) + "@", l)
    if m:
        qid = m.group(1)
        break
if not qid:
    print("no message-id=<%s@...> in the Postfix log" % tok)
    sys.exit(1)
pid = None
at = None
for i, l in enumerate(lines):
    m = re.search(r"/smtpd\[(\d+)\]: " + qid + r": client=", l)
    if m:
        pid, at = m.group(1), i
        break
if pid is None:
    print("no smtpd client= line for %s" % qid)
    sys.exit(1)
pat = re.compile(r"/smtpd\[" + pid + r"\]: ")
start = max(i for i in range(at + 1) if pat.search(lines[i]) and " connect from " in lines[i])
end = next((i for i in range(at, len(lines)) if pat.search(lines[i]) and " disconnect from " in lines[i]), None)
if end is None:
    print("session of smtpd[%s] has not ended" % pid)
    sys.exit(1)
session = [l for l in lines[start:end + 1] if pat.search(l)]
qids = [m.group(1) for l in session for m in [re.search(r": ([0-9A-F]+): client=", l)] if m]
for l in session:
    print(l)
print("queue ids in this session: %s" % " ".join(qids))
for q in qids:
    for l in lines:
        if re.search(r": " + q + r": (to=|message-id=|from=)", l):
            print(l)
disc = session[-1]
ok = len(qids) == 1 and " data=1 " in disc and " mail=1 " in disc and "rcpt=1 " in disc
sys.exit(0 if ok else 1)
PYEOF

# Topmost Received header of a delivered file, unfolded.
first_received() {
    awk '/^Received:/ && !inh {h=$0; inh=1; next} inh && /^[ \t]/ {h=h " " $0; next} inh {print h; exit}' "$1" | tr -s ' \t' ' '
}

SW2=(swaks --server "$IP2" --port $P2_SMTP --helo client.example --from alice@moat.test --timeout 20)
if ((rx_ok)); then
    # Submit everything first, then wait: the deliveries and the bounces run in parallel.
    tok_v="interop-moat-verify-$RANDOM$RANDOM"
    tok_p="interop-moat-plain-$RANDOM$RANDOM"
    tok_e="interop-moat-encrypt-$RANDOM$RANDOM"
    tok_b="interop-moat-badname-$RANDOM$RANDOM"
    submit_ok=1
    for pair in "verify:$tok_v:pfv@postfix.test" "plain:$tok_p:pfp@plain.test" \
                "encrypt:$tok_e:pfe@secure-plain.test" "badname:$tok_b:pfb@badname.test"; do
        IFS=: read -r what t rcpt <<<"$pair"
        rc=0
        "${SW2[@]}" --to "$rcpt" --header "Subject: $t" --header "Message-Id: <$t@moat.test>" \
            >"$W/swaks-moat2-$what.out" 2>&1 || rc=$?
        if ((rc != 0)); then
            submit_ok=0
            fail "swaks -> sending Moat accepts mail for $rcpt" "swaks exited $rc" "$W/swaks-moat2-$what.out"
        fi
    done

    # (a) verify: delivered over verified TLS.
    name="Moat -> Postfix (relay, tls_policy verify + ca_file + match_names): delivered, Postfix stamps TLSv1.3"
    if f=$(wait_for_mail "$PR/vmail/postfix.test/new" 20 "$tok_v"); then
        rcvd=$(first_received "$f")
        if [[ $rcvd == *"by mx.postfix.test (Postfix) with ESMTPS"* ]] \
           && grep -Eq '\(using TLSv1\.3 with cipher TLS_[A-Z0-9_]+ \([0-9]+/[0-9]+ bits\)' <<<"$rcvd"; then
            pass "$name"
        else
            fail "$name" "Postfix's Received header lacks ESMTPS / 'using TLSv1.3 with cipher': $rcvd" "$f"
        fi
    else
        fail "$name" "no file with $tok_v in Postfix's postfix.test Maildir" "$W/moat2.log" "$PR/log/maillog"
    fi

    name="Moat log: one 'delivery attempt' line (ip, TLSv1.3, verified, accepted), then delivered (..., verified)"
    end=$((SECONDS + 10)); ok=0
    while ((SECONDS < end)); do
        if grep -E "delivery attempt .*ip=$PR_RX_TLS:$PR_PORT .*level=\"verify\" (mta_sts=[a-z]+ )?tls=TLSv1\.3 with cipher .*verified outcome=1 of 1 recipient" "$W/moat2.log" >/dev/null 2>&1 \
           && grep -E "delivered .*to=pfv@postfix.test .*relay=$PR_RX_TLS .*TLSv1\.3 .*verified\)" "$W/moat2.log" >/dev/null 2>&1; then
            ok=1; break
        fi
        sleep 0.2
    done
    if ((ok)); then
        pass "$name"
    else
        fail "$name" "no verified 'delivery attempt' line and 'delivered ... verified' line for pfv@postfix.test" "$W/moat2.log"
    fi

    # (b) may toward a receiver without STARTTLS: plaintext.
    name="Moat -> Postfix without STARTTLS (policy may): delivered in plaintext, no 'using TLS'"
    if f=$(wait_for_mail "$PR/vmail/plain.test/new" 20 "$tok_p"); then
        rcvd=$(first_received "$f")
        if [[ $rcvd == *"by mx.postfix.test (Postfix) with ESMTP id"* && $rcvd != *"using TLS"* ]] \
           && grep -Eq "delivery attempt .*ip=$PR_RX_PLAIN:$PR_PORT .*tls=plaintext outcome=1 of 1 recipient" "$W/moat2.log" \
           && grep -Eq "delivered .*to=pfp@plain.test .*\(plaintext\)" "$W/moat2.log"; then
            pass "$name"
        else
            fail "$name" "expected 'with ESMTP id' without 'using TLS' and Moat's plaintext log lines: $rcvd" "$f" "$W/moat2.log"
        fi
    else
        fail "$name" "no file with $tok_p in Postfix's plain.test Maildir" "$W/moat2.log" "$PR/log/maillog"
    fi

    # (c) encrypt toward a receiver without STARTTLS: never sent, DSN 5.4.317 to the sender.
    name="Moat encrypt policy, receiver without STARTTLS: DSN with Status: 5.4.317 to alice@moat.test"
    dsn=""
    end=$((SECONDS + 20))
    while ((SECONDS < end)); do
        dsn=$(grep -rlF -- "$tok_e" "$DATA2/mail/alice/new" 2>/dev/null | head -n 1 || true)
        [[ -n "$dsn" ]] && break
        sleep 0.2
    done
    if [[ -z "$dsn" ]]; then
        fail "$name" "no DSN mentioning $tok_e in $DATA2/mail/alice/new within 20 s" "$W/moat2.log"
    elif grep -q '^Status: 5\.4\.317' "$dsn" && grep -qi '^Final-Recipient: rfc822; *pfe@secure-plain.test' "$dsn" \
         && grep -qi '^Action: failed' "$dsn" && grep -qi 'multipart/report' "$dsn"; then
        pass "$name"
    else
        fail "$name" "DSN lacks Status: 5.4.317 / Final-Recipient / Action: failed" "$dsn"
    fi

    name="Moat encrypt policy, receiver without STARTTLS: nothing sent in plaintext"
    if [[ -d "$PR/vmail/secure-plain.test" ]] || grep -rqsF -- "$tok_e" "$PR/vmail" \
       || grep -qE "message-id=<$tok_e@|to=<pfe@secure-plain.test>" "$PR/log/maillog"; then
        fail "$name" "Postfix accepted the message for pfe@secure-plain.test" "$PR/log/maillog"
    elif ! grep -E "to=pfe@secure-plain.test .*status=4\.4\.317" "$W/moat2.log" >/dev/null; then
        fail "$name" "Moat's log shows no 4.4.317 deferral for pfe@secure-plain.test" "$W/moat2.log"
    else
        pass "$name"
    fi

    # Negative control for (a): the name the certificate does not carry must not be accepted.
    name="Moat verify with match_names=wrong.postfix.test: not delivered, DSN to the sender"
    dsn=""
    end=$((SECONDS + 20))
    while ((SECONDS < end)); do
        dsn=$(grep -rlF -- "$tok_b" "$DATA2/mail/alice/new" 2>/dev/null | head -n 1 || true)
        [[ -n "$dsn" ]] && break
        sleep 0.2
    done
    if [[ -d "$PR/vmail/badname.test" ]] || grep -qE "message-id=<$tok_b@" "$PR/log/maillog"; then
        fail "$name" "Postfix received the message despite the name mismatch" "$PR/log/maillog" "$W/moat2.log"
    elif [[ -z "$dsn" ]]; then
        fail "$name" "no DSN mentioning $tok_b within 20 s" "$W/moat2.log"
    elif grep -Eq '^Status: 5\.[0-9]+\.[0-9]+' "$dsn" && grep -qi '^Action: failed' "$dsn"; then
        pass "$name"
    else
        fail "$name" "DSN lacks a 5.x.x Status / Action: failed" "$dsn"
    fi

    # (d) SMTP smuggling. On the default listener (bare_newline = reject) the content is refused
    # with 550 5.6.2 and nothing is relayed (asserted after the normalize checks, which give a
    # wrongly relayed message time to show up in Postfix's log).
    rej_toks=()
    rej_ok=1
    for variant in lf crlf-lf lf-crlf; do
        tok="interop-smuggle-reject-$variant-$RANDOM$RANDOM"
        rej_toks+=("$tok")
        out="$W/smuggle-reject-$variant.out"
        timeout 60 python3 "$W/smuggle.py" "$IP2" $P2_SMTP "$variant" "smuggle@plain.test" "$tok" >"$out" 2>&1 || true
        if ! grep -q '^S: 550 5\.6\.2 ' "$out" || ! grep -q '^replies after the content: 550 221$' "$out"; then
            rej_ok=0
        fi
    done
    cat "$W"/smuggle-reject-*.out >"$W/smuggle-reject.out"

    # On the normalize listener Moat must relay one message with the look-alike as content;
    # the lenient Postfix must see exactly one transaction.
    for variant in lf crlf-lf lf-crlf; do
        case $variant in
            lf) shown='<LF>.<LF>' ;;
            crlf-lf) shown='<CR><LF>.<LF>' ;;
            lf-crlf) shown='<LF>.<CR><LF>' ;;
        esac
        name="SMTP smuggling ($shown) via Moat normalize -> Postfix 3.7: one message relayed, nothing for victim"
        tok="interop-smuggle-$variant-$RANDOM$RANDOM"
        out="$W/smuggle-$variant.out"
        rc=0
        timeout 60 python3 "$W/smuggle.py" "$IP2" $P2_NORM "$variant" "smuggle@plain.test" "$tok" >"$out" 2>&1 || rc=$?
        if ((rc != 0)); then
            fail "$name" "Moat did not answer exactly 250 to the content and 221 to QUIT (rc=$rc)" "$out"
            continue
        fi
        if ! f=$(wait_for_mail "$PR/vmail/plain.test/new" 20 "$tok"); then
            fail "$name" "the message never reached Postfix" "$out" "$W/moat2.log" "$PR/log/maillog"
            continue
        fi
        # Let a second (smuggled) transaction, if any, reach the log.
        end=$((SECONDS + 10)); rc=1
        while ((SECONDS < end)); do
            rc=0
            python3 "$W/pf-session.py" "$PR/log/maillog" "$tok" >"$W/smuggle-$variant-session.out" 2>&1 || rc=$?
            grep -q 'disconnect from' "$W/smuggle-$variant-session.out" && break
            sleep 0.2
        done
        if ((rc != 0)); then
            fail "$name" "Postfix's session did not hold exactly one transaction" "$W/smuggle-$variant-session.out" "$out"
        elif [[ -e "$PR/vmail/victim" ]] || grep -qF 'to=<victim@postfix.test>' "$PR/log/maillog"; then
            fail "$name" "Postfix delivered a message to victim@postfix.test" "$PR/log/maillog" "$out"
        elif ! grep -qF 'RCPT TO:<victim@postfix.test>' "$f"; then
            fail "$name" "the delivered message does not carry the look-alike as content" "$f"
        else
            pass "$name"
        fi
    done

    name="SMTP smuggling via Moat's default listener (bare_newline reject): 550 5.6.2, nothing relayed"
    relayed=0
    for tok in "${rej_toks[@]}"; do
        grep -qF -- "$tok" "$PR/log/maillog" && relayed=1
        grep -rqsF -- "$tok" "$PR/vmail" && relayed=1
    done
    if ((!rej_ok)); then
        fail "$name" "Moat did not answer 550 5.6.2 (then 221) to each payload" "$W/smuggle-reject.out"
    elif ((relayed)) || [[ -e "$PR/vmail/victim" ]]; then
        fail "$name" "a refused payload reached Postfix" "$PR/log/maillog" "$W/smuggle-reject.out"
    else
        pass "$name"
    fi

    # Control: the same bytes sent straight to the Postfix downstream ARE smuggled there, so
    # the checks above would see a second transaction if Moat passed the look-alike through.
    name="control: the same payloads sent straight to Postfix 3.7 are smuggled (2 transactions each)"
    ok=1
    : >"$W/smuggle-control.out"
    for variant in lf crlf-lf lf-crlf; do
        tok="interop-direct-$variant-$RANDOM$RANDOM"
        timeout 60 python3 "$W/smuggle.py" $PR_RX_PLAIN $PR_PORT "$variant" "direct@plain.test" "$tok" \
            "control-victim@postfix.test" >>"$W/smuggle-control.out" 2>&1 || true
        end=$((SECONDS + 10)); seen=0
        while ((SECONDS < end)); do
            python3 "$W/pf-session.py" "$PR/log/maillog" "$tok" >"$W/smuggle-control-$variant.out" 2>&1 || true
            if grep -Eq 'queue ids in this session: [0-9A-F]+ [0-9A-F]+$' "$W/smuggle-control-$variant.out" \
               && grep -q 'from=<attacker@evil.example>' "$W/smuggle-control-$variant.out"; then
                seen=1; break
            fi
            sleep 0.2
        done
        if ((!seen)); then
            ok=0
            cat "$W/smuggle-control-$variant.out" >>"$W/smuggle-control.out"
        fi
    done
    if ((ok)); then
        pass "$name"
    else
        fail "$name" "Postfix did not split a payload into two transactions: the smuggling checks are void" "$W/smuggle-control.out"
    fi

    if kill -0 "$MOAT2_PID" 2>/dev/null; then
        pass "sending Moat stayed up"
    else
        fail "sending Moat stayed up" "the server process exited" "$W/moat2.log"
    fi
fi

# ---------------------------------------------------------------------------------------------
# 4f. testssl.sh
# ---------------------------------------------------------------------------------------------
log "testssl.sh (protocols, server defaults, ciphers per protocol)"
rc=0
timeout 300 "$TESTSSL" --starttls smtp --quiet --color 0 --warnings batch --nodns none -p -S -E \
    --add-ca "$W/ca.crt" --jsonfile "$W/testssl.json" "$IP:$P_SMTP" >"$W/testssl.out" 2>&1 || rc=$?
if [[ ! -s "$W/testssl.json" ]]; then
    fail "testssl.sh ran" "no JSON output (rc=$rc)" "$W/testssl.out"
else
    cat >"$W/testssl-check.py" <<'PYEOF'
import json, re, sys
data = json.load(open(sys.argv[1]))
if isinstance(data, dict):
    data = data.get("scanResult", [data])
rows = {}
ciphers = []
for r in data:
    rid, fnd = r.get("id", ""), r.get("finding", "")
    rows[rid] = fnd
    if rid.startswith("cipher-") or rid.startswith("cipher_x"):
        ciphers.append((rid, fnd))
fails = []
def want(rid, offered):
    f = rows.get(rid)
    if f is None:
        fails.append("%s: missing from testssl output" % rid)
    elif offered and not f.startswith("offered"):
        fails.append("%s: expected offered, got %r" % (rid, f))
    elif not offered and not f.startswith("not offered"):
        fails.append("%s: expected not offered, got %r" % (rid, f))
    print("protocol %-7s %s" % (rid, f))
for rid in ["SSLv2", "SSLv3", "TLS1", "TLS1_1"]:
    want(rid, False)
for rid in ["TLS1_2", "TLS1_3"]:
    want(rid, True)
if not ciphers:
    fails.append("no per-protocol cipher rows (-E) found")
weak = re.compile(r"NULL|anon|ADH|AECDH|EXP|RC4|RC2|(^|[-_ ])DES|3DES|DES-CBC3|IDEA|SEED|MD5", re.I)
for rid, fnd in ciphers:
    print("cipher   %s" % fnd)
    if not rid.startswith(("cipher-tls1_2_", "cipher-tls1_3_")):
        fails.append("cipher offered below TLS 1.2: %s" % fnd)
    # finding: "TLSv1.2  xc02b  ECDHE-ECDSA-AES128-GCM-SHA256  ECDH 253  AESGCM  128  TLS_..."
    m = re.search(r"\s(\d+)\s+TLS_\S+\s*$", fnd) or re.search(r"\s(\d+)\s+\S*\s*$", fnd)
    bits = int(m.group(1)) if m else None
    if bits is None:
        fails.append("cannot parse key size: %s" % fnd)
    elif bits < 128:
        fails.append("cipher with < 128-bit encryption: %s" % fnd)
    if weak.search(fnd):
        fails.append("weak cipher offered: %s" % fnd)
for f in fails:
    print("PROBLEM: " + f)
sys.exit(1 if fails else 0)
PYEOF
    rc2=0
    python3 "$W/testssl-check.py" "$W/testssl.json" >"$W/testssl-check.out" 2>&1 || rc2=$?
    name="testssl.sh: only TLS 1.2 and 1.3 offered, no cipher < 128 bits or NULL/anon/EXPORT/RC4/DES/3DES"
    if ((rc2 == 0)); then
        pass "$name"
    else
        fail "$name" "testssl findings (testssl rc=$rc)" "$W/testssl-check.out" "$W/testssl.out"
    fi
    name="testssl.sh: certificate chain of trust passes with the test CA"
    trust=$(python3 -c 'import json,sys
d=json.load(open(sys.argv[1])); d=d.get("scanResult",[d]) if isinstance(d,dict) else d
print(next((r.get("finding","") for r in d if r.get("id")=="cert_chain_of_trust"),"(missing)"))' "$W/testssl.json")
    if [[ $trust == passed* ]]; then
        pass "$name"
    else
        fail "$name" "cert_chain_of_trust: $trust" "$W/testssl.out"
    fi
fi

# ---------------------------------------------------------------------------------------------
# 4g. moat probe and moat sts check against Postfix, a Knot DNS server and an nginx policy host
# ---------------------------------------------------------------------------------------------
# One Postfix instance, one smtpd per address, all on port 2525:
#   127.0.0.35  STARTTLS, certificate for mx.good.interop.test       (MX of good.interop.test)
#   127.0.0.36  STARTTLS, certificate for mx.wrong.interop.test      (MX 10 of bad.interop.test)
#   127.0.0.37  STARTTLS, certificate for mx2.bad.interop.test, expired in 2020 (MX 20 of bad)
#   127.0.0.38  no STARTTLS
#   127.0.0.39  nothing listens (closed port)
# 127.0.0.33:5353  Knot, authoritative for interop.test (UDP and TCP)
# 127.0.0.34:8443  nginx: https://mta-sts.{good,bad}.interop.test/.well-known/mta-sts.txt (SNI)
# good.interop.test's policy covers its MX; bad.interop.test's lists only mx2.bad.interop.test.
log "moat probe / moat sts check against Postfix, Knot and nginx"
ST="$W/sts"
PS="$W/postfix-sts"
ST_DNS=127.0.0.33
ST_DNS_PORT=5353
ST_WEB=127.0.0.34
ST_WEB_PORT=8443
ST_GOOD=127.0.0.35
ST_WRONG=127.0.0.36
ST_EXPIRED=127.0.0.37
ST_PLAIN=127.0.0.38
ST_CLOSED=127.0.0.39
ST_PORT=2525
mkdir -p "$ST/ca-db" "$ST/knot/db" "$ST/www/good" "$ST/www/bad" "$ST/nginx/tmp"

# st_leaf NAME SAN [START END]: key + certificate NAME.{key,crt} from the test CA, valid for SAN
# (a comma-separated subjectAltName value). With START and END (YYYYMMDDHHMMSSZ) it is signed by
# `openssl ca`, which takes any validity period (OpenSSL 3.0's `x509 -req` cannot back-date).
st_leaf() {
    local base=$ST/$1 san=$2 cn=${2%%,*}
    openssl ecparam -name prime256v1 -genkey -noout -out "$base.key"
    openssl req -new -key "$base.key" -subj "/CN=${cn#DNS:}" -out "$base.csr"
    printf '%s\n' "subjectAltName=$san" "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" >"$base.ext"
    if (($# > 2)); then
        openssl ca -batch -notext -config "$ST/ca.cnf" -cert "$W/ca.crt" -keyfile "$W/ca.key" \
            -in "$base.csr" -out "$base.crt" -startdate "$3" -enddate "$4" -extfile "$base.ext"
    else
        openssl x509 -req -in "$base.csr" -CA "$W/ca.crt" -CAkey "$W/ca.key" -CAcreateserial \
            -sha256 -days 2 -extfile "$base.ext" -out "$base.crt"
    fi
    chmod 644 "$base.crt"
}
cat >"$ST/ca.cnf" <<EOF
[ ca ]
default_ca = interop_ca
[ interop_ca ]
database = $ST/ca-db/index.txt
new_certs_dir = $ST/ca-db
serial = $ST/ca-db/serial
default_md = sha256
policy = interop_policy
unique_subject = no
[ interop_policy ]
commonName = supplied
EOF
: >"$ST/ca-db/index.txt"
echo 1000 >"$ST/ca-db/serial"
st_ok=1
{
    st_leaf good "DNS:mx.good.interop.test" &&
    st_leaf wrong "DNS:mx.wrong.interop.test" &&
    st_leaf expired "DNS:mx2.bad.interop.test" 20200101000000Z 20200201000000Z &&
    st_leaf web "DNS:mta-sts.good.interop.test,DNS:mta-sts.bad.interop.test"
} >"$ST/openssl.log" 2>&1 || st_ok=0
if ((st_ok)) && ! openssl x509 -in "$ST/expired.crt" -noout -checkend 0 >/dev/null 2>&1 \
   && openssl x509 -in "$ST/expired.crt" -noout -enddate | grep -q 'Feb  1 00:00:00 2020 GMT'; then
    :
else
    st_ok=0
    fail "probe/sts test certificates made (good, wrong name, expired 2020-02-01, policy host)" \
        "openssl failed or the expired certificate is not expired" "$ST/openssl.log"
fi

# Postfix with four smtpd services.
mkdir -p "$PS_DIR" "$PS/queue" "$PS/data" "$PS/log"
chown postfix "$PS/data"
chmod 755 "$PS" "$PS/log"
cat >"$PS_DIR/main.cf" <<EOF
compatibility_level = 3.6
config_directory = $PS_DIR
queue_directory = $PS/queue
data_directory = $PS/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.good.interop.test
mydomain = interop.test
mydestination =
alias_maps =
alias_database =
local_recipient_maps =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtp_dns_support_level = disabled
maillog_file = $PS/log/maillog
maillog_file_prefixes = $PS/log
smtpd_tls_security_level = may
smtpd_tls_cert_file = $ST/good.crt
smtpd_tls_key_file = $ST/good.key
smtpd_tls_loglevel = 1
smtpd_tls_session_cache_database =
smtpd_peername_lookup = no
EOF
cat >"$PS_DIR/master.cf" <<EOF
$ST_GOOD:$ST_PORT inet n - n - - smtpd
  -o syslog_name=postfix-sts-good
$ST_WRONG:$ST_PORT inet n - n - - smtpd
  -o syslog_name=postfix-sts-wrong
  -o myhostname=mx.bad.interop.test
  -o smtpd_tls_cert_file=$ST/wrong.crt
  -o smtpd_tls_key_file=$ST/wrong.key
$ST_EXPIRED:$ST_PORT inet n - n - - smtpd
  -o syslog_name=postfix-sts-expired
  -o myhostname=mx2.bad.interop.test
  -o smtpd_tls_cert_file=$ST/expired.crt
  -o smtpd_tls_key_file=$ST/expired.key
$ST_PLAIN:$ST_PORT inet n - n - - smtpd
  -o syslog_name=postfix-sts-plain
  -o myhostname=mx.plain.interop.test
  -o smtpd_tls_security_level=none
pickup      unix  n       -       n       60      1       pickup
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
EOF

# Knot: authoritative for interop.test.
cat >"$ST/knot/interop.test.zone" <<EOF
\$ORIGIN interop.test.
\$TTL 300
@                 SOA   ns.interop.test. hostmaster.interop.test. 1 3600 600 86400 300
@                 NS    ns
ns                A     $ST_DNS
good              MX    10 mx.good
mx.good           A     $ST_GOOD
mta-sts.good      A     $ST_WEB
_mta-sts.good     TXT   "v=STSv1; id=1;"
_smtp._tls.good   TXT   "v=TLSRPTv1; rua=mailto:tlsrpt@good.interop.test"
bad               MX    10 mx.bad
bad               MX    20 mx2.bad
mx.bad            A     $ST_WRONG
mx2.bad           A     $ST_EXPIRED
mta-sts.bad       A     $ST_WEB
_mta-sts.bad      TXT   "v=STSv1; id=1;"
EOF
cat >"$ST/knot/knot.conf" <<EOF
server:
    listen: $ST_DNS@$ST_DNS_PORT
    rundir: $ST/knot
database:
    storage: $ST/knot/db
log:
  - target: stderr
    any: info
zone:
  - domain: interop.test
    storage: $ST/knot
    file: interop.test.zone
    zonefile-sync: -1
    journal-content: none
EOF

# nginx: the policy host, one server block (and certificate name) per policy domain.
printf 'version: STSv1\r\nmode: enforce\r\nmx: mx.good.interop.test\r\nmax_age: 604800\r\n' >"$ST/www/good/mta-sts.txt"
printf 'version: STSv1\r\nmode: enforce\r\nmx: mx2.bad.interop.test\r\nmax_age: 604800\r\n' >"$ST/www/bad/mta-sts.txt"
chmod -R a+rX "$ST/www"
{
    cat <<EOF
worker_processes 1;
pid $ST/nginx/nginx.pid;
error_log $ST/nginx/error.log info;
events { worker_connections 64; }
http {
    log_format sts '\$ssl_server_name \$host "\$request" \$status';
    access_log $ST/nginx/access.log sts;
    client_body_temp_path $ST/nginx/tmp/body;
    proxy_temp_path $ST/nginx/tmp/proxy;
    fastcgi_temp_path $ST/nginx/tmp/fastcgi;
    uwsgi_temp_path $ST/nginx/tmp/uwsgi;
    scgi_temp_path $ST/nginx/tmp/scgi;
    default_type application/octet-stream;
EOF
    for d in good bad; do
        cat <<EOF
    server {
        listen $ST_WEB:$ST_WEB_PORT ssl;
        server_name mta-sts.$d.interop.test;
        ssl_certificate $ST/web.crt;
        ssl_certificate_key $ST/web.key;
        root $ST/www/$d;
        location = /.well-known/mta-sts.txt {
            default_type text/plain;
            alias $ST/www/$d/mta-sts.txt;
        }
    }
EOF
    done
    echo "}"
} >"$ST/nginx/nginx.conf"

if ((st_ok)); then
    rc=0
    script -qec "postfix -c $PS_DIR check" /dev/null >"$W/postfix-sts-check.out" 2>&1 || rc=$?
    if ((rc != 0)); then
        st_ok=0
        fail "Postfix (4 smtpd), Knot and nginx start for the probe/sts checks" "postfix check failed (rc=$rc)" "$W/postfix-sts-check.out"
    else
        PS_STARTED=1
        script -qec "postfix -c $PS_DIR start" /dev/null >"$W/postfix-sts-start.out" 2>&1 || rc=$?
    fi
fi
if ((st_ok)); then
    knotd -c "$ST/knot/knot.conf" >"$ST/knot/knot.log" 2>&1 &
    KNOT_PID=$!
    nginx -p "$ST/nginx" -c "$ST/nginx/nginx.conf" -e "$ST/nginx/error.log" -g 'daemon off;' >"$ST/nginx/stdout.log" 2>&1 &
    NGINX_PID=$!
    ps_pid=$(postfix_master "$PS/queue")
    : >"$ST/listen.err"
    # Each address must be held by the server started here for it (not merely answer).
    for spec in "Postfix:${ps_pid:-0}:tcp:$ST_GOOD:$ST_PORT" "Postfix:${ps_pid:-0}:tcp:$ST_WRONG:$ST_PORT" \
                "Postfix:${ps_pid:-0}:tcp:$ST_EXPIRED:$ST_PORT" "Postfix:${ps_pid:-0}:tcp:$ST_PLAIN:$ST_PORT" \
                "knotd:$KNOT_PID:udp:$ST_DNS:$ST_DNS_PORT" "knotd:$KNOT_PID:tcp:$ST_DNS:$ST_DNS_PORT" \
                "nginx:$NGINX_PID:tcp:$ST_WEB:$ST_WEB_PORT"; do
        IFS=: read -r who pid proto host port <<<"$spec"
        if ! wait_listener "$who" "$pid" "$proto" "$host:$port" 20 2>>"$ST/listen.err"; then
            st_ok=0
            fail "Postfix (4 smtpd), Knot and nginx start for the probe/sts checks" \
                "$who (pid $pid) does not listen on $host:$port ($proto): $(grep "^interop:" "$ST/listen.err" | tail -n 1)" \
                "$ST/listen.err" "$W/postfix-sts-start.out" "$PS/log/maillog" "$ST/knot/knot.log" "$ST/nginx/error.log"
            break
        fi
    done
fi
if ((st_ok)) && [[ -n "$(ss -Hltn src "$ST_CLOSED:$ST_PORT" 2>/dev/null)" ]]; then
    # The closed-port checks below need nothing at all there.
    st_ok=0
    fail "Postfix (4 smtpd), Knot and nginx start for the probe/sts checks" \
        "another process listens on $ST_CLOSED:$ST_PORT, which must stay closed" \
        "$(ss -Hltnp src "$ST_CLOSED:$ST_PORT" 2>&1)"
fi
if ((st_ok)); then
    # Knot answers over UDP once the zone is loaded; make sure before asserting on moat's view.
    end=$((SECONDS + 10))
    until python3 - "$ST_DNS" "$ST_DNS_PORT" <<'PYEOF' >/dev/null 2>&1
import socket, struct, sys
q = struct.pack(">HHHHHH", 0x4242, 0, 1, 0, 0, 0) + b"".join(
    bytes([len(l)]) + l.encode() for l in "good.interop.test".split(".")) + b"\0" + struct.pack(">HH", 15, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1)
s.sendto(q, (sys.argv[1], int(sys.argv[2])))
r = s.recv(4096)
sys.exit(0 if r[:2] == b"\x42\x42" and (r[3] & 15) == 0 and struct.unpack(">H", r[6:8])[0] > 0 else 1)
PYEOF
    do
        if ((SECONDS >= end)); then
            st_ok=0
            fail "Postfix (4 smtpd), Knot and nginx start for the probe/sts checks" "Knot does not answer MX good.interop.test" "$ST/knot/knot.log"
            break
        fi
        sleep 0.2
    done
fi

# jget FILE EXPR: prints the Python expression EXPR evaluated over the JSON document d in FILE
# (or the error, never failing: its output is compared, and `x=$(false)` would end the script).
jget() {
    python3 -c 'import json, sys
d = json.load(open(sys.argv[1]))
print(eval(sys.argv[2]))' "$1" "$2" 2>&1 || true
}

# probe_run OUT ARGS...: runs moat probe ARGS twice (text to OUT.txt, --json to OUT.json);
# sets prc (text run's exit status), jrc (JSON run's).
probe_run() {
    local out=$1
    shift
    prc=0
    jrc=0
    timeout 60 "$MOAT" probe --timeout 5 "$@" >"$out.txt" 2>&1 || prc=$?
    timeout 60 "$MOAT" probe --timeout 5 --json "$@" >"$out.json" 2>"$out.json.err" || jrc=$?
}

if ((st_ok)); then
    CA=(--ca-file "$W/ca.crt")

    # --- moat probe ---
    name="moat probe good certificate: exit 0, PASS, TLSv1.3, Postfix banner, WARN expires soon, JSON verdict pass"
    o="$ST/probe-good"
    probe_run "$o" "$ST_GOOD:$ST_PORT" --name mx.good.interop.test "${CA[@]}"
    if ((prc != 0 || jrc != 0)); then
        fail "$name" "exit status $prc (text), $jrc (json)" "$o.txt" "$o.json"
    elif ! grep -qx "PASS  $ST_GOOD:$ST_PORT offers STARTTLS with a certificate valid for mx.good.interop.test" "$o.txt" \
         || ! grep -Eq '^  tls +TLSv1\.3 TLS_[A-Z0-9_]+ \([0-9]+ bits\)' "$o.txt" \
         || ! grep -Eq '^  banner +220 mx\.good\.interop\.test ESMTP Postfix' "$o.txt" \
         || ! grep -Eq '^  verify +ok for mx\.good\.interop\.test' "$o.txt" \
         || ! grep -Eq '^WARN  the certificate expires (in [0-9]+ days?|within a day) \(' "$o.txt" \
         || grep -q '^FAIL' "$o.txt"; then
        fail "$name" "text output lacks the PASS / tls TLSv1.3 / Postfix banner / verify ok / WARN expires (2-day test certificate) lines" "$o.txt"
    elif [[ $(jget "$o.json" 'd["verdict"], d["tls"]["version"], d["tls"]["verification"]["result"], d["tls"]["verification"]["name_matches"], d["tls"]["chain"][0]["dns_names"], d["failures"], [w["kind"] for w in d["warnings"]]') \
            != "('pass', 'TLSv1.3', 'verified', True, ['mx.good.interop.test'], [], ['expires_soon'])" ]] \
         || [[ $(jget "$o.json" '"ESMTP Postfix" in " ".join(d["banner"]["lines"]) and "STARTTLS" in d["capabilities"] and "STARTTLS" not in d["capabilities_tls"]') != True ]]; then
        fail "$name" "JSON: $(jget "$o.json" 'd["verdict"], d["tls"]["version"], d["tls"]["verification"], d["banner"], d["failures"]')" "$o.json"
    else
        pass "$name"
    fi

    name="moat probe wrong-name certificate: exit 1, FAIL wrong name naming mx.wrong.interop.test"
    o="$ST/probe-wrong"
    probe_run "$o" "$ST_WRONG:$ST_PORT" --name mx.bad.interop.test "${CA[@]}"
    if ((prc != 1 || jrc != 1)); then
        fail "$name" "exit status $prc (text), $jrc (json), want 1" "$o.txt" "$o.json"
    elif ! grep -E '^FAIL  wrong name: ' "$o.txt" | grep -F 'mx.bad.interop.test' | grep -qF 'mx.wrong.interop.test' \
         || [[ $(grep -c '^FAIL' "$o.txt") != 1 ]] || grep -q '^PASS' "$o.txt" \
         || ! grep -Eq '^  verify +FAILED: not valid for mx\.bad\.interop\.test' "$o.txt"; then
        fail "$name" "want exactly one FAIL line, 'wrong name: ...' with both names, and 'verify FAILED: not valid for'" "$o.txt"
    elif [[ $(jget "$o.json" 'd["verdict"], [f["kind"] for f in d["failures"]], d["tls"]["verification"]["chain_trusted"], d["tls"]["verification"]["name_matches"]') \
            != "('fail', ['name_mismatch'], True, False)" ]]; then
        fail "$name" "JSON: $(jget "$o.json" 'd["verdict"], d["failures"], d["tls"]["verification"]')" "$o.json"
    else
        pass "$name"
    fi

    name="moat probe expired certificate: exit 1, FAIL expired (name matches)"
    o="$ST/probe-expired"
    probe_run "$o" "$ST_EXPIRED:$ST_PORT" --name mx2.bad.interop.test "${CA[@]}"
    if ((prc != 1 || jrc != 1)); then
        fail "$name" "exit status $prc (text), $jrc (json), want 1" "$o.txt" "$o.json"
    elif ! grep -Eq '^FAIL  expired: .*\([0-9]+ days ago\)$' "$o.txt" || [[ $(grep -c '^FAIL' "$o.txt") != 1 ]] \
         || ! grep -Eq '^  certificate +CN=mx2\.bad\.interop\.test .*valid 2020-01-01 \.\. 2020-02-01 \(expired [0-9]+ days ago\)' "$o.txt"; then
        fail "$name" "want exactly one 'FAIL  expired: ... (N days ago)' and the certificate line 'valid 2020-01-01 .. 2020-02-01 (expired N days ago)'" "$o.txt"
    elif [[ $(jget "$o.json" 'd["verdict"], [f["kind"] for f in d["failures"]], d["tls"]["chain"][0]["expired"], d["tls"]["verification"]["name_matches"]') \
            != "('fail', ['expired'], True, True)" ]]; then
        fail "$name" "JSON: $(jget "$o.json" 'd["verdict"], d["failures"], d["tls"]["chain"][0], d["tls"]["verification"]')" "$o.json"
    else
        pass "$name"
    fi

    name="moat probe Postfix without TLS: exit 1, FAIL STARTTLS not offered, no handshake"
    o="$ST/probe-plain"
    probe_run "$o" "$ST_PLAIN:$ST_PORT" --name mx.plain.interop.test "${CA[@]}"
    if ((prc != 1 || jrc != 1)); then
        fail "$name" "exit status $prc (text), $jrc (json), want 1" "$o.txt" "$o.json"
    elif ! grep -q '^FAIL  STARTTLS not offered' "$o.txt" || [[ $(grep -c '^FAIL' "$o.txt") != 1 ]] \
         || ! grep -Eq '^  banner +220 mx\.plain\.interop\.test ESMTP Postfix' "$o.txt" \
         || grep -q '^  C: STARTTLS' "$o.txt" || ! grep -q '^  C: QUIT' "$o.txt"; then
        fail "$name" "want one 'FAIL  STARTTLS not offered', the banner, no STARTTLS sent, a QUIT" "$o.txt"
    elif [[ $(jget "$o.json" 'd["verdict"], [f["kind"] for f in d["failures"]], d["tls"], "STARTTLS" in d["capabilities"]') \
            != "('fail', ['starttls_not_offered'], None, False)" ]]; then
        fail "$name" "JSON: $(jget "$o.json" 'd["verdict"], d["failures"], d["capabilities"]')" "$o.json"
    else
        pass "$name"
    fi

    name="moat probe closed port: exit 1, FAIL connection refused"
    o="$ST/probe-closed"
    probe_run "$o" "$ST_CLOSED:$ST_PORT" --name mx.closed.interop.test "${CA[@]}"
    if ((prc != 1 || jrc != 1)); then
        fail "$name" "exit status $prc (text), $jrc (json), want 1" "$o.txt" "$o.json"
    elif ! grep -qx "FAIL  connection refused: nothing listens on $ST_CLOSED:$ST_PORT, or a firewall rejects it" "$o.txt" \
         || [[ $(grep -c '^FAIL' "$o.txt") != 1 ]]; then
        fail "$name" "want exactly 'FAIL  connection refused: nothing listens on $ST_CLOSED:$ST_PORT, or a firewall rejects it'" "$o.txt"
    elif [[ $(jget "$o.json" 'd["verdict"], [f["kind"] for f in d["failures"]], [(c["address"], c["result"]) for c in d["connect"]], d["banner"]') \
            != "('fail', ['connection_refused'], [('$ST_CLOSED:$ST_PORT', 'refused')], None)" ]]; then
        fail "$name" "JSON: $(jget "$o.json" 'd["verdict"], d["failures"], d["connect"]')" "$o.json"
    else
        pass "$name"
    fi

    name="moat probe good certificate without --ca-file: exit 1, FAIL untrusted issuer (the test CA)"
    o="$ST/probe-noca"
    probe_run "$o" "$ST_GOOD:$ST_PORT" --name mx.good.interop.test
    if ((prc != 1 || jrc != 1)); then
        fail "$name" "exit status $prc (text), $jrc (json), want 1" "$o.txt" "$o.json"
    elif ! grep -E '^FAIL  untrusted issuer: ' "$o.txt" | grep -q 'Moat Interop Test CA' \
         || [[ $(grep -c '^FAIL' "$o.txt") != 1 ]]; then
        fail "$name" "want exactly one 'FAIL  untrusted issuer: ...' naming Moat Interop Test CA" "$o.txt"
    elif [[ $(jget "$o.json" 'd["verdict"], [f["kind"] for f in d["failures"]], d["tls"]["verification"]["chain_trusted"], d["tls"]["verification"]["name_matches"]') \
            != "('fail', ['untrusted_issuer'], False, True)" ]]; then
        fail "$name" "JSON: $(jget "$o.json" 'd["verdict"], d["failures"], d["tls"]["verification"]')" "$o.json"
    else
        pass "$name"
    fi

    # --- moat sts check ---
    STS=(timeout 60 "$MOAT" sts check --nameserver "$ST_DNS:$ST_DNS_PORT" --policy-port "$ST_WEB_PORT"
         --smtp-port "$ST_PORT" "${CA[@]}" --timeout 5)

    name="moat sts check good.interop.test (Knot + nginx + Postfix): exit 0, PASS txt, fetch, policy, mx, tls"
    o="$ST/sts-good"
    rc=0
    "${STS[@]}" good.interop.test >"$o.txt" 2>&1 || rc=$?
    if ((rc != 0)); then
        fail "$name" "exit status $rc" "$o.txt" "$ST/nginx/access.log" "$ST/knot/knot.log"
    elif ! grep -Eq '^PASS  txt +_mta-sts\.good\.interop\.test "v=STSv1; id=1;" \(id 1\)$' "$o.txt" \
         || ! grep -Eq "^PASS  fetch +https://mta-sts\.good\.interop\.test/\.well-known/mta-sts\.txt: 200, text/plain, [0-9]+ bytes in [0-9]+ ms from $ST_WEB\$" "$o.txt" \
         || ! grep -Eq '^PASS  policy +mode enforce, max_age 604800, mx mx\.good\.interop\.test$' "$o.txt" \
         || ! grep -Eq '^PASS  mx +mx\.good\.interop\.test is covered by the policy$' "$o.txt" \
         || ! grep -Eq '^PASS  tlsrpt +_smtp\._tls\.good\.interop\.test: reports go to mailto:tlsrpt@good\.interop\.test$' "$o.txt" \
         || ! grep -Eq "^PASS  tls +mx\.good\.interop\.test \[$ST_GOOD\]: STARTTLS, TLSv1\.3 TLS_[A-Z0-9_]+, certificate expires in [0-9]+ days?, valid for mx\.good\.interop\.test\$" "$o.txt" \
         || grep -Eq '^FAIL' "$o.txt" \
         || ! grep -Eq '^WARN  tls +mx\.good\.interop\.test: the certificate expires' "$o.txt" \
         || ! grep -qx 'good.interop.test: MTA-STS set up correctly (1 warning(s))' "$o.txt"; then
        fail "$name" "want PASS lines for txt, fetch, policy, tlsrpt, mx, tls, no FAIL, the 2-day certificate's expiry WARN and the 'set up correctly' summary" "$o.txt"
    else
        pass "$name"
    fi

    name="moat sts check good.interop.test --json: ok true, six findings pass (and the expiry warning), the policy text"
    rc=0
    "${STS[@]}" --json good.interop.test >"$o.json" 2>"$o.json.err" || rc=$?
    got=$(jget "$o.json" 'd["domain"], d["ok"], [(f["check"], f["status"]) for f in d["findings"]], "mx: mx.good.interop.test" in d["policy"]')
    if ((rc == 0)) && [[ $got == "('good.interop.test', True, [('txt', 'pass'), ('fetch', 'pass'), ('policy', 'pass'), ('tlsrpt', 'pass'), ('mx', 'pass'), ('tls', 'pass'), ('tls', 'warn')], True)" ]]; then
        pass "$name"
    else
        fail "$name" "exit $rc; got $got" "$o.json" "$o.json.err"
    fi

    name="moat sts check bad.interop.test: exit 1, FAIL mx (not covered) and FAIL tls (wrong name, expired), each with fix:"
    o="$ST/sts-bad"
    rc=0
    "${STS[@]}" bad.interop.test >"$o.txt" 2>&1 || rc=$?
    if ((rc != 1)); then
        fail "$name" "exit status $rc, want 1" "$o.txt"
    elif ! grep -Eq '^PASS  txt ' "$o.txt" || ! grep -Eq '^PASS  fetch ' "$o.txt" \
         || ! grep -Eq '^PASS  policy +mode enforce, max_age 604800, mx mx2\.bad\.interop\.test$' "$o.txt" \
         || ! grep -Eq '^PASS  mx +mx2\.bad\.interop\.test is covered by the policy$' "$o.txt"; then
        fail "$name" "want PASS txt, fetch, policy and 'mx2.bad.interop.test is covered'" "$o.txt"
    elif ! grep -A1 -E '^FAIL  mx +mx\.bad\.interop\.test matches no mx pattern of the policy$' "$o.txt" \
            | grep -Eq '^ +fix: add "mx: mx\.bad\.interop\.test" to the policy' \
         || ! grep -A1 -E "^FAIL  tls +mx\.bad\.interop\.test \[$ST_WRONG\]: wrong name: .*mx\.wrong\.interop\.test" "$o.txt" \
            | grep -Eq '^ +fix: use a certificate whose names include mx\.bad\.interop\.test; senders enforcing the policy' \
         || ! grep -A1 -E "^FAIL  tls +mx2\.bad\.interop\.test \[$ST_EXPIRED\]: expired: " "$o.txt" \
            | grep -Eq '^ +fix: renew the certificate of mx2\.bad\.interop\.test' \
         || [[ $(grep -c '^FAIL' "$o.txt") != 3 ]] \
         || ! grep -qx 'bad.interop.test: 3 problem(s), 1 warning(s); senders will not apply the policy as intended' "$o.txt"; then
        fail "$name" "want exactly: FAIL mx mx.bad (no mx pattern), FAIL tls mx.bad (wrong name), FAIL tls mx2.bad (expired), each followed by fix:, and '3 problem(s)'" "$o.txt"
    else
        pass "$name"
    fi

    name="moat sts check bad.interop.test --json: ok false, failures mx and tls x2 with fixes, no TLS-RPT record (info with fix)"
    rc=0
    "${STS[@]}" --json bad.interop.test >"$o.json" 2>"$o.json.err" || rc=$?
    got=$(jget "$o.json" 'd["ok"], [(f["check"], f["status"], bool(f.get("fix"))) for f in d["findings"]]')
    want="(False, [('txt', 'pass', False), ('fetch', 'pass', False), ('policy', 'pass', False), ('tlsrpt', 'info', True), ('mx', 'fail', True), ('tls', 'fail', True), ('tls', 'warn', False), ('mx', 'pass', False), ('tls', 'fail', True)])"
    if ((rc == 1)) && [[ $got == "$want" ]]; then
        pass "$name"
    else
        fail "$name" "exit $rc; got $got" "$o.json" "$o.json.err"
    fi

    # The policies came from nginx, each from the server block its SNI name selected.
    name="moat sts check fetched each policy from nginx with SNI mta-sts.<domain> (access log)"
    if grep -Eq '^mta-sts\.good\.interop\.test mta-sts\.good\.interop\.test "GET /\.well-known/mta-sts\.txt HTTP/1\.[01]" 200$' "$ST/nginx/access.log" \
       && grep -Eq '^mta-sts\.bad\.interop\.test mta-sts\.bad\.interop\.test "GET /\.well-known/mta-sts\.txt HTTP/1\.[01]" 200$' "$ST/nginx/access.log"; then
        pass "$name"
    else
        fail "$name" "nginx's access log lacks a 200 GET of the policy for each SNI name" "$ST/nginx/access.log"
    fi
fi

# ---------------------------------------------------------------------------------------------
# 5. Summary
# ---------------------------------------------------------------------------------------------
if kill -0 "$MOAT_PID" 2>/dev/null; then
    pass "moat stayed up for the whole suite"
else
    fail "moat stayed up for the whole suite" "the server process exited" "$W/moat.log"
fi
if ((FAILED > 0)); then
    echo "---- moat log (tail) ----"
    tail -n 60 "$W/moat.log" | sed 's/^/  | /'
    printf 'failed checks:\n'
    printf '  - %s\n' "${FAILED_NAMES[@]}"
fi
echo "run time: $(($(date +%s) - START)) s"
echo "interop: $PASSED passed, $FAILED failed"
((FAILED == 0))
