#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine, skipping what is already there:
# real Prometheus and Alertmanager, and Apache Kafka (pinned, from Maven artifacts,
# scripts/kafka/install.sh), cached under $SAFECLOCK_CACHE so a second run is instant.
#
# Prints what it installed as shell assignments, for `eval "$(bash scripts/install-deps.sh)"`:
#   SAFECLOCK_KAFKA_LIBS=...   the class path directory of the Kafka broker and tools
set -euo pipefail

SAFECLOCK_CACHE=${SAFECLOCK_CACHE:-$HOME/.cache/safeclock}
export SAFECLOCK_CACHE

log() { printf '[install-deps] %s\n' "$*" >&2; }

# safeclock itself needs no Debian package beyond a C and C++ compiler, make and perl: rdkafka
# builds librdkafka, OpenSSL, zlib and zstd from source (docs/fresh-machine.md).
apt_packages=(prometheus prometheus-alertmanager curl)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts the packaged daemons; the tests run their own on loopback ports.
  for svc in prometheus prometheus-alertmanager prometheus-node-exporter; do
    $SUDO systemctl disable --now "$svc" >/dev/null 2>&1 || $SUDO service "$svc" stop >/dev/null 2>&1 || true
  done
fi

kafka_libs=$(bash "$(dirname "$0")/kafka/install.sh" | tail -n 1)
log "kafka: $kafka_libs"
printf 'SAFECLOCK_KAFKA_LIBS=%q\n' "$kafka_libs"
