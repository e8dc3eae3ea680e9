#!/usr/bin/env bash
# Property-based API testing of the intake with Schemathesis: generates requests from
# services/intake/openapi.json, sends them to a running intake, and fails on any server error
# or any response (status, headers, content type, body) the document does not allow.
#
#   bash scripts/schemathesis.sh                 # starts Apache Kafka and intake itself
#   SAFECLOCK_TEST_BROKERS=127.0.0.1:9092 bash scripts/schemathesis.sh   # uses that broker
#   MAX_EXAMPLES=500 bash scripts/schemathesis.sh
#   SAFECLOCK_BIN=target/debug/safeclock bash scripts/schemathesis.sh   # no build, that binary
#
# Schemathesis is installed from PyPI into a venv under ~/.cache/safeclock (override with
# SAFECLOCK_CACHE) the first time. Exits non-zero on any finding.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[schemathesis] %s\n' "$*" >&2; }
cache="${SAFECLOCK_CACHE:-$HOME/.cache/safeclock}"
venv="$cache/schemathesis-venv"
max_examples="${MAX_EXAMPLES:-100}"

if [ ! -x "$venv/bin/schemathesis" ]; then
  log "installing schemathesis into $venv"
  if ! { python3 -m venv "$venv" && "$venv/bin/pip" install --quiet schemathesis; }; then
    rm -rf "$venv"
    if [ "${SCHEMATHESIS_OPTIONAL:-0}" = 1 ]; then
      log "cannot install schemathesis (no network to PyPI?): skipped"
      exit 0
    fi
    log "cannot install schemathesis from PyPI"
    exit 1
  fi
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }
workdir=$(mktemp -d -t safeclock-schemathesis.XXXXXX)
kafka_dir=""
intake_pid=""
cleanup() {
  status=$?
  if [ -n "$kafka_dir" ]; then bash scripts/kafka/start.sh --stop "$kafka_dir" >/dev/null 2>&1 || true; fi
  for pid in "$intake_pid"; do
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
  if [ $status -ne 0 ] && [ -f "$workdir/intake.log" ]; then
    log "last lines of the intake log:"
    tail -n 20 "$workdir/intake.log" >&2 || true
  fi
  rm -rf "$workdir"
  exit $status
}
trap cleanup EXIT INT TERM

if [ -z "${SAFECLOCK_TEST_BROKERS:-}" ]; then
  eval "$(bash scripts/install-deps.sh)"
  log "starting Apache Kafka (one KRaft node)"
  started=$(KAFKA_LIBS="$SAFECLOCK_KAFKA_LIBS" bash scripts/kafka/start.sh -n 1 --daemon --max-lifetime 3600)
  kafka_dir=$(sed -n 's/^dir=//p' <<<"$started")
  SAFECLOCK_TEST_BROKERS=$(sed -n 's/^bootstrap=//p' <<<"$started")
fi

if [ -n "${SAFECLOCK_BIN:-}" ]; then
  bin="$SAFECLOCK_BIN"
  log "using $bin"
else
  log "building safeclock"
  cargo build --quiet -p safeclock
  bin="${CARGO_TARGET_DIR:-target}/debug/safeclock"
fi

intake_port=$(free_port)
ops_port=$(free_port)
token="schemathesis-$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
log "starting intake on 127.0.0.1:$intake_port (broker $SAFECLOCK_TEST_BROKERS)"
SAFECLOCK__KAFKA__BROKERS="$SAFECLOCK_TEST_BROKERS" \
SAFECLOCK__KAFKA__TOPIC_PREFIX="schemathesis-$intake_port." \
SAFECLOCK__KAFKA__PARTITIONS=3 \
SAFECLOCK__OPS__LISTEN="127.0.0.1:$ops_port" \
SAFECLOCK__INTAKE__LISTEN="127.0.0.1:$intake_port" \
SAFECLOCK__INTAKE__TOKENS__SCHEMATHESIS="$token" \
SAFECLOCK__INTAKE__CLIENTS__SCHEMATHESIS__FORCES="*" \
SAFECLOCK__INTAKE__MAX_BODY_BYTES=65536 \
  "$bin" run intake >"$workdir/intake.log" 2>&1 &
intake_pid=$!
for _ in $(seq 1 300); do
  if curl -fsS "http://127.0.0.1:$intake_port/readyz" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$intake_pid" 2>/dev/null; then log "intake exited at start"; cat "$workdir/intake.log" >&2; exit 1; fi
  sleep 0.2
done

log "schemathesis run (max $max_examples examples per operation)"
# From the scratch directory, so Schemathesis's cache (.schemathesis/) stays out of the tree.
spec="$PWD/services/intake/openapi.json"
cd "$workdir"
"$venv/bin/schemathesis" run "$spec" \
  --url "http://127.0.0.1:$intake_port" \
  --header "Authorization: Bearer $token" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,negative_data_rejection \
  --max-examples "$max_examples" \
  --seed "${SEED:-2015}" \
  --request-timeout 30
log "no findings"
