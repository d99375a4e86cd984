#!/usr/bin/env bash
# Installs a moat .deb for real, but into a throwaway copy of the system: inside a private
# mount namespace, /etc, /usr and /var are overlays whose changes land in a scratch directory
# and vanish with the namespace. Nothing on this machine changes (no user, no files).
#
#   packaging/install-test.sh PACKAGE.deb SCRATCH_DIR
#
# Checks: dpkg -i runs the maintainer scripts (user and group moat, /var/lib/moat 0750
# moat:moat, /etc/moat 0750 root:moat); the installed config passes `config check`; `man moat`
# finds the page; the server starts the way the systemd unit runs it (user moat, no root, only
# CAP_NET_BIND_SERVICE as an ambient capability, no new privileges) with the installed config
# moved to loopback and unused privileged ports, answers EHLO on its port-25 listener, writes
# only under /var/lib/moat and stops on SIGTERM; reinstall (upgrade path), remove (user and
# data kept) and purge (user, data and /etc/moat gone) work.
#
# Exit status 0: passed; 1: failed; 77: this machine cannot make the overlays (not root, or
# no mount namespaces / overlayfs), so nothing was tested.
set -euo pipefail

deb=$(realpath "$1")
scratch=$(realpath -m "$2")

if [ "${MOAT_INSTALL_TEST_INNER:-}" != 1 ]; then
    rm -rf "$scratch"
    mkdir -p "$scratch"
    if [ "$(id -u)" != 0 ] || ! unshare -m --propagation private \
        sh -c "mkdir -p '$scratch/probe/u' '$scratch/probe/w' '$scratch/probe/m' &&
               mount -t overlay overlay -o lowerdir=/etc,upperdir='$scratch/probe/u',workdir='$scratch/probe/w' '$scratch/probe/m'" \
        2>/dev/null; then
        rm -rf "$scratch"
        echo "install test skipped: no mount namespace with overlayfs here"
        exit 77
    fi
    rm -rf "$scratch/probe"
    status=0
    MOAT_INSTALL_TEST_INNER=1 unshare -m --propagation private "$0" "$deb" "$scratch" || status=$?
    rm -rf "$scratch"
    exit "$status"
fi

# ---- inside the private mount namespace ----------------------------------------------------
fail() { echo "install test: FAIL: $*" >&2; exit 1; }
for d in etc usr var; do
    mkdir -p "$scratch/$d/upper" "$scratch/$d/work"
    mount -t overlay overlay \
        -o "lowerdir=/$d,upperdir=$scratch/$d/upper,workdir=$scratch/$d/work" "/$d"
done

echo "dpkg -i $(basename "$deb")"
DEBIAN_FRONTEND=noninteractive dpkg -i "$deb" >/dev/null
getent passwd moat | grep -q ':/var/lib/moat:/usr/sbin/nologin$' || fail "no system user moat"
getent group moat >/dev/null || fail "no group moat"
[ "$(stat -c '%a %U:%G' /var/lib/moat)" = "750 moat:moat" ] ||
    fail "/var/lib/moat is $(stat -c '%a %U:%G' /var/lib/moat)"
[ "$(stat -c '%a %U:%G' /etc/moat)" = "750 root:moat" ] ||
    fail "/etc/moat is $(stat -c '%a %U:%G' /etc/moat)"
dpkg-query -W -f='${Conffiles}\n' moat | grep -q '/etc/moat/moat.toml' ||
    fail "/etc/moat/moat.toml is not registered as a conffile"
# The shipped config names certificates that are not there yet: its syntax alone.
moat config check --syntax-only /etc/moat/moat.toml
[ "$(man -w moat)" = /usr/share/man/man1/moat.1.gz ] || fail "man -w moat: $(man -w moat)"

# The files the gateway config names: throwaway self-signed certificates.
cd /etc/moat/tls
for n in mx.example.com mta-sts.example.com; do
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj "/CN=$n" -addext "subjectAltName=DNS:$n" -keyout "$n.key" -out "$n.crt" 2>/dev/null
done
cp mx.example.com.crt internal-ca.pem
chown root:moat ./*.key
chmod 0640 ./*.key
cd /
# The installed config on loopback and privileged ports that are normally free.
sed -e 's/"0\.0\.0\.0:25"/"127.0.0.1:24"/; s/"0\.0\.0\.0:465"/"127.0.0.1:466"/' \
    -e 's/"0\.0\.0\.0:587"/"127.0.0.1:588"/; s/"0\.0\.0\.0:443"/"127.0.0.1:444"/' \
    /etc/moat/moat.toml >/etc/moat/test.toml
moat config check /etc/moat/test.toml >/dev/null

echo "moat serve as user moat with only CAP_NET_BIND_SERVICE"
setpriv --reuid=moat --regid=moat --init-groups \
    --inh-caps=-all,+net_bind_service --ambient-caps=-all,+net_bind_service \
    --bounding-set=-all,+net_bind_service --no-new-privs \
    sh -c 'umask 0027; exec moat serve --config /etc/moat/test.toml' >"$scratch/serve.log" 2>&1 &
pid=$!
banner=""
for _ in $(seq 50); do
    if banner=$(timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/24; printf "EHLO test\r\nQUIT\r\n" >&3; cat <&3' 2>/dev/null) &&
        [ -n "$banner" ]; then
        break
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
done
if ! grep -q '^220 mx.example.com' <<<"$banner" || ! grep -q '^250 STARTTLS' <<<"$banner"; then
    kill "$pid" 2>/dev/null || true
    cat "$scratch/serve.log" >&2
    fail "no SMTP greeting and STARTTLS from the server on 127.0.0.1:24"
fi
echo "  $(head -n1 <<<"$banner" | tr -d '\r')"
[ -S /var/lib/moat/admin.sock ] || fail "no admin socket in /var/lib/moat"
[ "$(stat -c %U /var/lib/moat/spool)" = moat ] || fail "spool not owned by moat"
kill -TERM "$pid"
wait "$pid" || fail "moat serve exited with status $? after SIGTERM"
grep -q 'stopped' "$scratch/serve.log" || fail "no clean stop in the log"
rm /etc/moat/test.toml

echo "reinstall (upgrade path), remove, purge"
DEBIAN_FRONTEND=noninteractive dpkg -i "$deb" >/dev/null
dpkg -r moat >/dev/null
[ ! -e /usr/bin/moat ] || fail "/usr/bin/moat left after remove"
[ -d /var/lib/moat ] || fail "remove must keep /var/lib/moat"
getent passwd moat >/dev/null || fail "remove must keep the user moat"
[ -f /etc/moat/moat.toml ] || fail "remove must keep the configuration"
rm -f /etc/moat/tls/*
dpkg -P moat >/dev/null
[ ! -e /var/lib/moat ] || fail "/var/lib/moat left after purge"
[ ! -e /etc/moat ] || fail "/etc/moat left after purge"
if getent passwd moat >/dev/null; then fail "user moat left after purge"; fi
echo "install test passed"
