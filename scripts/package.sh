#!/usr/bin/env bash
# Builds the Debian package (issue 16): target/debian/tether_VERSION-1_ARCH.deb with the binary,
# the systemd unit (packaging/tether.service), /etc/tether/tether.toml (packaging/tether.toml,
# a conffile), the man page and the docs. Installs cargo-deb with cargo when missing.
#
#   scripts/package.sh          # build; prints the package's path last
#   scripts/package.sh --check  # build, install with dpkg -i, and check what was installed
#                               # (as root: it installs the package on this machine)
set -euo pipefail
cd "$(dirname "$0")/.."

check=false
[ "${1:-}" = "--check" ] && check=true

if ! command -v cargo-deb >/dev/null 2>&1; then
    echo "== installing cargo-deb"
    cargo install --locked --quiet cargo-deb
fi
cargo build --release --quiet -p tether
# The man page comes from the same flag definitions as --help.
mkdir -p target/man
target/release/tether man | gzip -9n > target/man/tether.1.gz
deb=$(cargo deb --no-build -p tether 2>&1 | tail -1)
[ -f "$deb" ] || { echo "cargo deb did not say where the package is: $deb" >&2; exit 1; }
if ! $check; then
    echo "$deb"
    exit 0
fi

# What the package must give an operator, checked on this machine.
missing=()
command -v man >/dev/null 2>&1 || missing+=(man-db)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
scripts/build-deps.sh "${missing[@]}"
echo "== dpkg -i $deb"
dpkg -i "$deb" >/dev/null
fail() { echo "package check failed: $*" >&2; exit 1; }
for f in /usr/bin/tether /lib/systemd/system/tether.service /etc/tether/tether.toml \
    /usr/share/man/man1/tether.1.gz /usr/share/doc/tether/operations.md; do
    [ -e "$f" ] || fail "$f is not installed"
done
getent passwd tether >/dev/null || fail "no tether system user"
[ "$(stat -c %U:%G:%a /etc/tether/tether.toml)" = "root:tether:640" ] \
    || fail "/etc/tether/tether.toml is $(stat -c %U:%G:%a /etc/tether/tether.toml), not root:tether:640"
dpkg-query -W -f='${Conffiles}\n' tether | grep -q /etc/tether/tether.toml \
    || fail "/etc/tether/tether.toml is not a conffile"
echo "== tether check --config /etc/tether/tether.toml"
/usr/bin/tether check --config /etc/tether/tether.toml
echo "== systemd-analyze verify tether.service"
out=$(systemd-analyze verify /lib/systemd/system/tether.service 2>&1) || fail "systemd-analyze: $out"
# verify exits 0 with warnings; any line about the unit itself is a failure.
if echo "$out" | grep -i 'tether.service' ; then fail "systemd-analyze has something to say"; fi
echo "== man -l"
page=$(MANWIDTH=100 man -l /usr/share/man/man1/tether.1.gz 2>&1) || fail "man: $page"
for want in NAME SYNOPSIS OPTIONS --listen --log-sessions SIGHUP "tether ctl"; do
    echo "$page" | grep -q -- "$want" || fail "the man page has no $want"
done
echo "$page" | grep -q 'warning' && fail "man warned: $(echo "$page" | grep warning)"
# Every flag of --help is on the page (both come from the same definitions).
flags=$(/usr/bin/tether --help | sed -n 's/^  \(--[a-z0-9-]*\).*/\1/p' | grep -vx -- --help)
for f in $flags; do
    echo "$page" | grep -q -- "$f" || fail "the man page lacks $f"
done
echo "ok: $deb installs; the man page has all $(echo "$flags" | wc -l) flags; the unit verifies"
