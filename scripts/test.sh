#!/usr/bin/env bash
# The whole safeclock test suite, on a fresh machine or a warm one:
#   1. installs what is missing (Debian packages, the tansu broker into a cache directory);
#   2. checks formatting and clippy;
#   3. checks the Prometheus rules (promtool check/test rules) and that generated deployment
#      files (dashboards) are up to date;
#   4. starts a real Kafka-protocol broker (tansu), a real Prometheus and a real Alertmanager
#      (Debian's prometheus-alertmanager) on free loopback ports;
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

tansu=$(bash scripts/install-deps.sh | tail -n 1)
export SAFECLOCK_TANSU="$tansu" # the intake outage test restarts a broker of its own

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

workdir=$(mktemp -d -t safeclock-test.XXXXXX)
broker_pid=""
prometheus_pid=""
alertmanager_pid=""
cleanup() {
  status=$?
  if [ $status -ne 0 ]; then log "disk space at the failure:"; disk_free; fi
  for pid in "$broker_pid" "$prometheus_pid" "$alertmanager_pid"; do
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
  if [ $status -ne 0 ] && [ -f "$workdir/prometheus.log" ]; then
    log "last lines of the Prometheus log:"
    tail -n 20 "$workdir/prometheus.log" >&2 || true
  fi
  if [ $status -ne 0 ] && [ -f "$workdir/alertmanager.log" ]; then
    log "last lines of the Alertmanager log:"
    tail -n 15 "$workdir/alertmanager.log" >&2 || true
  fi
  if [ $status -ne 0 ] && [ -f "$workdir/tansu.log" ]; then
    log "tests failed; last lines of the broker log:"
    tail -n 30 "$workdir/tansu.log" >&2 || true
  fi
  rm -rf "$workdir"
  exit $status
}
trap cleanup EXIT INT TERM

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
log "starting tansu on 127.0.0.1:$port"
"$tansu" broker \
  --listener-url "tcp://127.0.0.1:$port" \
  --advertised-listener-url "tcp://127.0.0.1:$port" \
  --storage-engine memory://tansu/ >"$workdir/tansu.log" 2>&1 &
broker_pid=$!
for _ in $(seq 1 100); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
  if ! kill -0 "$broker_pid" 2>/dev/null; then log "tansu exited at start"; cat "$workdir/tansu.log" >&2; exit 1; fi
  sleep 0.1
done
export SAFECLOCK_TEST_BROKERS="127.0.0.1:$port"

# A real Prometheus: scrapes whatever tests/prometheus.rs writes into the targets file every
# second, and evaluates the repository's recording and alert rules every second.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }
prom_port=$(free_port)
echo '[]' >"$workdir/targets.json"
cat >"$workdir/prometheus.yml" <<YAML
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - $PWD/deploy/prometheus/rules/*.yml
scrape_configs:
  - job_name: safeclock-exporter
    file_sd_configs:
      - files: ["$workdir/targets.json"]
        refresh_interval: 1s
YAML
log "starting prometheus on 127.0.0.1:$prom_port"
prometheus --config.file="$workdir/prometheus.yml" --storage.tsdb.path="$workdir/prometheus-data" \
  --web.listen-address="127.0.0.1:$prom_port" >"$workdir/prometheus.log" 2>&1 &
prometheus_pid=$!
for _ in $(seq 1 100); do
  if curl -fsS "http://127.0.0.1:$prom_port/-/ready" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$prometheus_pid" 2>/dev/null; then log "prometheus exited at start"; cat "$workdir/prometheus.log" >&2; exit 1; fi
  sleep 0.2
done
export SAFECLOCK_TEST_PROMETHEUS="http://127.0.0.1:$prom_port"
export SAFECLOCK_TEST_PROMETHEUS_TARGETS="$workdir/targets.json"

# A real Alertmanager for the escalator's integration test: loopback only, clustering off,
# storage in the temporary directory.
am_port=$(free_port)
cat >"$workdir/alertmanager.yml" <<'YAML'
route:
  receiver: "null"
receivers:
  - name: "null"
YAML
log "starting Alertmanager on 127.0.0.1:$am_port"
/usr/bin/prometheus-alertmanager \
  --config.file="$workdir/alertmanager.yml" \
  --storage.path="$workdir/alertmanager-data" \
  --web.listen-address="127.0.0.1:$am_port" \
  --cluster.listen-address= >"$workdir/alertmanager.log" 2>&1 &
alertmanager_pid=$!
for _ in $(seq 1 100); do
  if curl -fsS "http://127.0.0.1:$am_port/-/ready" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$alertmanager_pid" 2>/dev/null; then log "Alertmanager exited at start"; cat "$workdir/alertmanager.log" >&2; exit 1; fi
  sleep 0.1
done
export SAFECLOCK_TEST_ALERTMANAGER="http://127.0.0.1:$am_port"

log "cargo test --workspace (broker $SAFECLOCK_TEST_BROKERS, Prometheus $SAFECLOCK_TEST_PROMETHEUS, Alertmanager $SAFECLOCK_TEST_ALERTMANAGER)"
cargo test --workspace "$@"

# The intake's HTTP contract: Schemathesis against services/intake/openapi.json and a running
# intake on the same broker (about 10 s; skipped if Schemathesis cannot be installed from PyPI).
# The binary is the one `cargo test` just built: building `-p safeclock` alone would compile and
# link it again with other features, for no gain.
log "schemathesis against the intake"
SAFECLOCK_BIN="$target_dir/debug/safeclock" SCHEMATHESIS_OPTIONAL=1 bash scripts/schemathesis.sh
