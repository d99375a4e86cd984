#!/usr/bin/env bash
# Interop suite: Moat against real third-party software (swaks, OpenSSL s_client, Python's
# ssl module, Postfix as a sending MTA, testssl.sh).
#
# Runs on a fresh Debian 12 machine as root: installs what it needs (apt), builds nothing but
# the moat binary if it is missing, uses only 127.0.0.x addresses, cleans up after itself.
#
#   MOAT_BIN=/path/to/moat tests/interop/run.sh
#
# Ends with one line `interop: N passed, M failed` and exits non-zero when M > 0.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
MOAT="${MOAT_BIN:-$REPO/target/debug/moat}"
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
         testssl.sh procps bsdextrautils bsdutils python3 ca-certificates; do
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
for tool in swaks openssl python3 script; do
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
PF_DIR="$W/postfix/etc"
PF_STARTED=0

cleanup() {
    local rc=$?
    set +e
    if [[ -n "$MOAT_PID" ]] && kill -0 "$MOAT_PID" 2>/dev/null; then
        kill -TERM "$MOAT_PID" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$MOAT_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$MOAT_PID" 2>/dev/null
        wait "$MOAT_PID" 2>/dev/null
    fi
    if ((PF_STARTED)); then
        postfix -c "$PF_DIR" stop >/dev/null 2>&1
        local mpid
        mpid=$(cat "$W/postfix/queue/pid/master.pid" 2>/dev/null | tr -d ' ')
        if [[ -n "$mpid" ]]; then
            for _ in $(seq 50); do kill -0 "$mpid" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$mpid" 2>/dev/null
        fi
    fi
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

wait_port() {
    local host=$1 port=$2 secs=$3
    local end=$((SECONDS + secs))
    while ((SECONDS < end)); do
        if timeout 2 bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null; then return 0; fi
        sleep 0.2
    done
    return 1
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
} >"$W/openssl-ca.log" 2>&1 || { cat "$W/openssl-ca.log"; echo "interop: making the test CA failed" >&2; exit 2; }
chmod 644 ca.crt server.crt

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
for port in $P_SMTP $P_SMTPS $P_SUB; do
    if ! wait_port "$IP" "$port" 20 || ! kill -0 "$MOAT_PID" 2>/dev/null; then
        cat "$W/moat.log"
        echo "interop: moat did not start listening on $IP:$port" >&2
        exit 2
    fi
done
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
    if ((rc != 0)); then
        pf_ok=0
        fail "Postfix instance starts" "postfix start failed (rc=$rc)" "$W/postfix-start.out" "$PF/log/maillog"
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
# 4e. testssl.sh
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
