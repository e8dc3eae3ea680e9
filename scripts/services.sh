# Sourced by the test scripts: starts what the integration tests run against, on free loopback
# ports, and stops it again on exit:
#   - Apache Kafka, one KRaft node (scripts/kafka/start.sh, installed by scripts/install-deps.sh);
#   - a real Prometheus that scrapes whatever tests/prometheus.rs writes into its targets file
#     and evaluates the repository's recording and alert rules every second;
#   - a real Alertmanager (Debian's prometheus-alertmanager), clustering off.
# It exports SAFECLOCK_TEST_BROKERS, SAFECLOCK_TEST_PROMETHEUS, SAFECLOCK_TEST_PROMETHEUS_TARGETS
# and SAFECLOCK_TEST_ALERTMANAGER for the tests (and SAFECLOCK_KAFKA_LIBS, for the tests that start
# Kafka clusters of their own).
#
#   eval "$(bash scripts/install-deps.sh)"
#   source scripts/services.sh
#   trap 'stop_services $?' EXIT INT TERM
#   start_services

services_log() { printf '[services] %s\n' "$*" >&2; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }

services_workdir=""
services_pids=()
services_kafka_dir=""

# stop_services STATUS: stops them; on a failing STATUS, shows the end of their logs first.
stop_services() {
  local status=${1:-0}
  for pid in "${services_pids[@]}"; do
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
  services_pids=()
  if [ $status -ne 0 ] && [ -n "$services_kafka_dir" ] && [ -f "$services_kafka_dir/node-1/logs/server.log" ]; then
    services_log "last lines of the Kafka broker log:"
    tail -n 20 "$services_kafka_dir/node-1/logs/server.log" >&2 || true
  fi
  if [ -n "$services_kafka_dir" ]; then
    bash scripts/kafka/start.sh --stop "$services_kafka_dir" >/dev/null 2>&1 || true
    services_kafka_dir=""
  fi
  if [ $status -ne 0 ] && [ -n "$services_workdir" ]; then
    for name in prometheus alertmanager; do
      if [ -f "$services_workdir/$name.log" ]; then
        services_log "last lines of the $name log:"
        tail -n 20 "$services_workdir/$name.log" >&2 || true
      fi
    done
  fi
  if [ -n "$services_workdir" ]; then rm -rf "$services_workdir"; fi
  services_workdir=""
}

# wait_for NAME PID CHECK...: runs CHECK until it succeeds (10 s at most), failing if PID exits.
wait_for() {
  local name=$1 pid=$2
  shift 2
  for _ in $(seq 1 100); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then
      services_log "$name exited at start"
      cat "$services_workdir/$name.log" >&2
      return 1
    fi
    sleep 0.1
  done
  services_log "$name did not become ready within 10 s"
  return 1
}

tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_services() {
  : "${SAFECLOCK_KAFKA_LIBS:?run eval \"\$(bash scripts/install-deps.sh)\" first}"
  export SAFECLOCK_KAFKA_LIBS
  services_workdir=$(mktemp -d -t safeclock-services.XXXXXX)

  services_log "starting Apache Kafka (one KRaft node)"
  local started
  started=$(KAFKA_LIBS="$SAFECLOCK_KAFKA_LIBS" bash scripts/kafka/start.sh -n 1 --partitions 3 \
    --daemon --max-lifetime 10800 2>"$services_workdir/kafka-start.log") || {
    cat "$services_workdir/kafka-start.log" >&2
    return 1
  }
  services_kafka_dir=$(sed -n 's/^dir=//p' <<<"$started")
  export SAFECLOCK_TEST_BROKERS
  SAFECLOCK_TEST_BROKERS=$(sed -n 's/^bootstrap=//p' <<<"$started")
  services_log "Kafka on $SAFECLOCK_TEST_BROKERS ($(sed -n 's/^ready_ms=\([0-9]*\).*/\1/p' <<<"$started") ms to ready)"

  local prom_port
  prom_port=$(free_port)
  echo '[]' >"$services_workdir/targets.json"
  cat >"$services_workdir/prometheus.yml" <<YAML
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - $PWD/deploy/prometheus/rules/*.yml
scrape_configs:
  - job_name: safeclock-exporter
    file_sd_configs:
      - files: ["$services_workdir/targets.json"]
        refresh_interval: 1s
YAML
  services_log "starting prometheus on 127.0.0.1:$prom_port"
  prometheus --config.file="$services_workdir/prometheus.yml" \
    --storage.tsdb.path="$services_workdir/prometheus-data" \
    --web.listen-address="127.0.0.1:$prom_port" >"$services_workdir/prometheus.log" 2>&1 &
  services_pids+=($!)
  wait_for prometheus $! curl -fsS "http://127.0.0.1:$prom_port/-/ready"
  export SAFECLOCK_TEST_PROMETHEUS="http://127.0.0.1:$prom_port"
  export SAFECLOCK_TEST_PROMETHEUS_TARGETS="$services_workdir/targets.json"

  local am_port
  am_port=$(free_port)
  cat >"$services_workdir/alertmanager.yml" <<'YAML'
route:
  receiver: "null"
receivers:
  - name: "null"
YAML
  services_log "starting Alertmanager on 127.0.0.1:$am_port"
  /usr/bin/prometheus-alertmanager \
    --config.file="$services_workdir/alertmanager.yml" \
    --storage.path="$services_workdir/alertmanager-data" \
    --web.listen-address="127.0.0.1:$am_port" \
    --cluster.listen-address= >"$services_workdir/alertmanager.log" 2>&1 &
  services_pids+=($!)
  wait_for alertmanager $! curl -fsS "http://127.0.0.1:$am_port/-/ready"
  export SAFECLOCK_TEST_ALERTMANAGER="http://127.0.0.1:$am_port"
}
