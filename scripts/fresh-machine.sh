#!/usr/bin/env bash
# Proves the README's first command on a fresh machine: a minimal Debian root made by debootstrap
# (variant minbase: the Essential packages and apt, nothing else), this machine's Rust toolchain
# bind-mounted into it read-only, and a copy of the work tree. Inside, as a newcomer would, it
# runs exactly `cargo run --release -p safeclock -- demo` with an empty cargo registry (crates are
# downloaded afresh) and an empty target directory.
#
# It runs twice (docs/fresh-machine.md has the figures):
#   1. in the bare root, which shows what a toolchain alone lacks (it stops early: the Rust
#      toolchain itself needs a C linker on Linux);
#   2. in a copy of the root with only $FRESH_PACKAGES installed (--no-install-recommends), which
#      must build and run the demo to its summary.
#
# Needs root (debootstrap, chroot, mount), debootstrap (`apt-get install debootstrap`, installed
# here when missing), a Debian mirror (read from this machine's apt sources, or
# SAFECLOCK_DEBIAN_MIRROR) and about 2 GB of disk. The roots are cached under
# $SAFECLOCK_CACHE/fresh-root, so a second run skips debootstrap; the registry and target
# directories inside are emptied on every run. Each step is bounded by `timeout`.
#
#   bash scripts/fresh-machine.sh                 # both runs
#   FRESH_SKIP_BARE=1 bash scripts/fresh-machine.sh   # only the run with the packages
#   FRESH_PREPARE_ONLY=1 bash scripts/fresh-machine.sh  # make the roots (and the bare run) only
#
# Exit status 0 only when the demo in the second root ran to its summary.
set -euo pipefail

SAFECLOCK_CACHE=${SAFECLOCK_CACHE:-$HOME/.cache/safeclock}
SUITE=${FRESH_SUITE:-bookworm}
# The honest minimum beside rustup's toolchain (docs/fresh-machine.md says why each is there).
FRESH_PACKAGES=${FRESH_PACKAGES:-"ca-certificates gcc g++ libc6-dev make perl"}
BUILD_TIMEOUT=${FRESH_BUILD_TIMEOUT:-3600}
DEMO_TIMEOUT=${FRESH_DEMO_TIMEOUT:-300}
RUSTUP_HOME_HOST=${RUSTUP_HOME:-$HOME/.rustup}
CARGO_HOME_HOST=${CARGO_HOME:-$HOME/.cargo}
# This machine's CA bundle for cargo in the root (empty: none; see enter()).
HOST_CA=${FRESH_HOST_CA-}
if [ -z "${FRESH_HOST_CA+set}" ]; then
  if [ -n "${SSL_CERT_FILE:-}" ]; then
    HOST_CA=$SSL_CERT_FILE
  elif compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    HOST_CA=/etc/ssl/certs/ca-certificates.crt
  fi
fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
BASE="$SAFECLOCK_CACHE/fresh-root"
BARE="$BASE/$SUITE-minbase"
TOOLS="$BASE/$SUITE-tools"
LOGS="$BASE/logs"

log() { printf '[fresh-machine] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot and mount)"
[ -x "$CARGO_HOME_HOST/bin/cargo" ] || die "no Rust toolchain at $CARGO_HOME_HOST/bin"
[ -d "$RUSTUP_HOME_HOST/toolchains" ] || die "no rustup toolchains at $RUSTUP_HOME_HOST"

mirror() {
  if [ -n "${SAFECLOCK_DEBIAN_MIRROR:-}" ]; then echo "$SAFECLOCK_DEBIAN_MIRROR"; return; fi
  local m=""
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    m=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' \
          /etc/apt/sources.list.d/debian.sources)
  fi
  if [ -z "$m" ] && [ -f /etc/apt/sources.list ]; then
    m=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) { print $i; exit } }' \
          /etc/apt/sources.list)
  fi
  [ -n "$m" ] || die "cannot read a Debian mirror from this machine's apt sources: set SAFECLOCK_DEBIAN_MIRROR"
  echo "$m"
}

# Mount points inside a root, unmounted in reverse order on exit.
MOUNTED=()
cleanup() {
  local i
  for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do
    umount -l "${MOUNTED[$i]}" 2>/dev/null || true
  done
  MOUNTED=()
}
trap cleanup EXIT INT TERM

mounted_under() { findmnt -rn -o TARGET | awk -v r="$1" 'index($0, r "/") == 1' | grep -q .; }

# Removes a directory inside a root, refusing while anything is mounted in that root.
safe_rm() {
  local root=$1 dir=$2
  mounted_under "$root" && die "refusing to remove $dir: something is still mounted under $root"
  rm -rf "$dir"
}

bind() { # bind SRC DST [ro]
  mkdir -p "$2"
  mount --bind "$1" "$2"
  MOUNTED+=("$2")
  if [ "${3:-}" = ro ]; then mount -o remount,bind,ro "$2"; fi
}

enter() { # enter ROOT: mounts /proc, /dev and the toolchain
  local root=$1
  mount -t proc proc "$root/proc"; MOUNTED+=("$root/proc")
  bind /dev "$root/dev"
  bind "$RUSTUP_HOME_HOST" "$root/root/.rustup" ro
  bind "$CARGO_HOME_HOST/bin" "$root/root/.cargo/bin" ro
  cp -L /etc/resolv.conf "$root/etc/resolv.conf"
  # Where this machine reaches the crate registry through a TLS-intercepting egress, cargo in
  # the root needs this machine's CA bundle too (Debian's ca-certificates alone would be refused).
  # It goes to cargo only (CARGO_HTTP_CAINFO), not into the root's trust store.
  if [ -n "$HOST_CA" ]; then cp -L "$HOST_CA" "$root/etc/host-ca-bundle.crt"; fi
}

in_root() { # in_root ROOT SECONDS COMMAND...: a login-like environment, as a new user has
  local root=$1 secs=$2; shift 2
  timeout --kill-after=30 "$secs" chroot "$root" /usr/bin/env -i \
    HOME=/root PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    TERM=dumb LANG=C.UTF-8 RUSTUP_HOME=/root/.rustup CARGO_HOME=/root/.cargo \
    ${HOST_CA:+CARGO_HTTP_CAINFO=/etc/host-ca-bundle.crt} \
    /bin/bash -c "$*"
}

make_bare() {
  if [ -f "$BARE/.safeclock-debootstrap-done" ]; then
    log "bare root: cached at $BARE"
    return
  fi
  command -v debootstrap >/dev/null || {
    log "installing debootstrap"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  }
  local m; m=$(mirror)
  log "bare root: debootstrap --variant=minbase $SUITE into $BARE"
  mkdir -p "$BASE"
  safe_rm "$BARE.partial" "$BARE.partial"
  timeout 1800 debootstrap --variant=minbase "$SUITE" "$BARE.partial" "$m" >"$LOGS/debootstrap.log" 2>&1 \
    || die "debootstrap failed (log: $LOGS/debootstrap.log)"
  mv "$BARE.partial" "$BARE"
  touch "$BARE/.safeclock-debootstrap-done"
}

make_tools() {
  local marker="$TOOLS/.safeclock-packages"
  if [ -f "$marker" ] && [ "$(cat "$marker")" = "$FRESH_PACKAGES" ]; then
    log "root with packages: cached at $TOOLS ($FRESH_PACKAGES)"
    return
  fi
  safe_rm "$TOOLS" "$TOOLS"
  cp -a "$BARE" "$TOOLS"
  log "root with packages: apt-get install --no-install-recommends $FRESH_PACKAGES"
  mount -t proc proc "$TOOLS/proc"; MOUNTED+=("$TOOLS/proc")
  bind /dev "$TOOLS/dev"
  cp -L /etc/resolv.conf "$TOOLS/etc/resolv.conf"
  in_root "$TOOLS" 1200 "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $FRESH_PACKAGES" \
    >"$LOGS/apt-tools.log" 2>&1 || die "apt-get in the root failed (log: $LOGS/apt-tools.log)"
  in_root "$TOOLS" 60 "apt-get clean"
  cleanup
  echo "$FRESH_PACKAGES" >"$marker"
}

# Copies the work tree (tracked and untracked files, not ignored ones: no target/) into ROOT/src.
copy_tree() {
  local root=$1
  safe_rm "$root" "$root/src/safeclock"
  mkdir -p "$root/src/safeclock"
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
     | xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh \
     | tar --null -T - -cf -) | tar -C "$root/src/safeclock" -xf -
}

# run ROOT NAME: the README's command in ROOT with an empty registry and target; logs to $LOGS.
run() {
  local root=$1 name=$2 rc=0
  copy_tree "$root"
  safe_rm "$root" "$root/root/.cargo"
  mkdir -p "$root/root/.cargo/bin" "$root/root/.rustup"
  enter "$root"
  log "$name: packages: $(in_root "$root" 60 "dpkg-query -W -f='\${Package}\n' | wc -l") installed;" \
      "cc: $(in_root "$root" 60 'command -v cc || echo none')," \
      "c++: $(in_root "$root" 60 'command -v c++ || echo none')," \
      "make: $(in_root "$root" 60 'command -v make || echo none')," \
      "perl: $(in_root "$root" 60 'command -v perl || echo none')"
  log "$name: cargo run --release -p safeclock -- demo (log: $LOGS/$name.log)"
  local start=$SECONDS
  in_root "$root" "$((BUILD_TIMEOUT + DEMO_TIMEOUT))" \
    "cd /src/safeclock && cargo --version && rustc --version && time cargo run --release -p safeclock -- demo" \
    >"$LOGS/$name.log" 2>&1 || rc=$?
  local took=$((SECONDS - start))
  cleanup
  if grep -q 'Finished `release` profile' "$LOGS/$name.log"; then
    log "$name: $(grep 'Finished `release` profile' "$LOGS/$name.log" | tail -n 1 | sed 's/^ *//')"
  fi
  log "$name: exit $rc after ${took}s; last lines:"
  tail -n 12 "$LOGS/$name.log" | sed 's/^/    /' >&2
  return "$rc"
}

mkdir -p "$LOGS"
make_bare

if [ -z "${FRESH_SKIP_BARE:-}" ]; then
  if run "$BARE" bare; then
    log "bare: the demo ran in a root without a C toolchain (unexpected: update docs/fresh-machine.md)"
  else
    grep -m 1 -E 'linker .* not found|error: ' "$LOGS/bare.log" | sed 's/^/[fresh-machine] bare: first error: /' >&2 || true
  fi
fi

make_tools
if [ -n "${FRESH_PREPARE_ONLY:-}" ]; then
  log "prepared $TOOLS; FRESH_PREPARE_ONLY is set, so no build in it"
  exit 0
fi
if run "$TOOLS" tools && grep -qi 'summary' "$LOGS/tools.log"; then
  log "OK: the demo built and ran in a fresh $SUITE root with only: $FRESH_PACKAGES"
else
  die "FAILED: the demo did not run in the root with: $FRESH_PACKAGES (log: $LOGS/tools.log)"
fi
