#!/usr/bin/env bash
# The whole safeclock test suite, on a fresh machine or a warm one:
#   1. installs what is missing (Debian packages, Apache Kafka into a cache directory);
#   2. checks formatting and clippy;
#   3. checks the Prometheus rules (promtool check/test rules) and that generated deployment
#      files (dashboards) are up to date;
#   4. starts Apache Kafka (one KRaft node), a real Prometheus and a real Alertmanager
#      (Debian's prometheus-alertmanager) on free loopback ports (scripts/services.sh);
#   5. runs every test: unit, component (in-process mock cluster), integration (real broker,
#      real Prometheus, real Alertmanager);
#   6. stops what it started, on success and on failure.
# Extra arguments go to `cargo test` (e.g. scripts/test.sh -p safeclock-clock).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[test] %s\n' "$*" >&2; }

# A clean test build needs about 3 GB under the target directory (see [profile.dev] in
# Cargo.toml). Say how much there is up front, and again if anything fails, so a full disk reads
# as a full disk rather than as a linker crash.
target_dir="${CARGO_TARGET_DIR:-target}"
mkdir -p "$target_dir"
disk_free() { df -h "$target_dir" "${TMPDIR:-/tmp}" 2>/dev/null | awk 'NR > 1 { print "  " $6 ": " $4 " free of " $2 }' | sort -u >&2; }
log "disk space:"
disk_free
free_kb=$(df -Pk "$target_dir" | awk 'NR == 2 { print $4 }')
if [ "${free_kb:-0}" -lt $((4 * 1024 * 1024)) ]; then
  log "WARNING: under 4 GB free for $target_dir; the build may fail for lack of space"
fi

eval "$(bash scripts/install-deps.sh)"

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings
# Build everything before the broker starts, so the broker is not left waiting on a compile.
log "building tests"
cargo test --workspace --no-run --quiet "$@"

log "promtool check rules / test rules"
promtool check rules deploy/prometheus/rules/*.yml
promtool test rules deploy/prometheus/tests/*.yml
log "generated dashboards are up to date"
python3 deploy/grafana/generate.py --check

# The broker, Prometheus and Alertmanager the integration tests run against (stopped on exit).
source scripts/services.sh
on_exit() {
  local status=$?
  if [ $status -ne 0 ]; then log "disk space at the failure:"; disk_free; fi
  stop_services $status
  exit $status
}
trap on_exit EXIT INT TERM
start_services

# The slowloris cases hold 2,000 connections open from the test process (and the server end in
# intake): more descriptors than a default soft limit of 1024 allows.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
log "cargo test --workspace (broker $SAFECLOCK_TEST_BROKERS, Prometheus $SAFECLOCK_TEST_PROMETHEUS, Alertmanager $SAFECLOCK_TEST_ALERTMANAGER)"
cargo test --workspace --no-fail-fast "$@"

# No test may depend on when it runs: run the suites that lean most on "now" once more with the
# clock of the tests and of every service they start moved to the eve of a bank holiday, late
# in the evening (scripts/time-matrix.sh runs them at more instants).
if [ $# -eq 0 ]; then
  log "again at an injected time: 2026-12-24T23:30:00Z"
  SAFECLOCK_TEST_NOW=2026-12-24T23:30:00Z cargo test -p safeclock-tests --test real_broker --test escalator
  SAFECLOCK_TEST_NOW=2026-12-24T23:30:00Z cargo test -p safeclock --test crash_recovery
fi

# The intake's HTTP contract: Schemathesis against services/intake/openapi.json and a running
# intake on the same broker (about 10 s; skipped if Schemathesis cannot be installed from PyPI).
# The binary is the one `cargo test` just built: building `-p safeclock` alone would compile and
# link it again with other features, for no gain.
log "schemathesis against the intake"
SAFECLOCK_BIN="$target_dir/debug/safeclock" SCHEMATHESIS_OPTIONAL=1 bash scripts/schemathesis.sh
