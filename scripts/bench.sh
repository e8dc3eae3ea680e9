#!/usr/bin/env bash
# Benchmarks, figures printed to stdout:
#   - the engine core without Kafka (throughput, bytes per open clock, restore time);
#   - the escalator's delivery layer to a local webhook (notifications/s, added latency p99 at
#     a paced 1,000/s);
#   - the exporter's counting without Kafka (SLA events/s) and one partition's snapshot (size,
#     write and restore time);
#   - end to end through a real broker process (tansu on a free loopback port) beside its raw
#     consume rate, measured in the same run;
#   - the escalator through the same broker: breaches paged per second, and produce-to-page
#     latency at a paced 1,000/s.
#   - accepted events/s through intake beside the broker's raw produce rate, in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
tansu=$(bash scripts/install-deps.sh | tail -n 1)

cargo bench -p safeclock-clock --bench engine
cargo bench -p safeclock-escalator --bench delivery
cargo bench -p safeclock-exporter --bench recorder

workdir=$(mktemp -d -t safeclock-bench.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
"$tansu" broker --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
  --storage-engine memory://tansu/ >"$workdir/tansu.log" 2>&1 &
broker_pid=$!
trap 'kill $broker_pid 2>/dev/null; wait $broker_pid 2>/dev/null; rm -rf "$workdir"' EXIT
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
SAFECLOCK_TEST_BROKERS="127.0.0.1:$port" cargo bench -p safeclock-tests --bench e2e
SAFECLOCK_TEST_BROKERS="127.0.0.1:$port" cargo bench -p safeclock-tests --bench escalator
SAFECLOCK_TEST_BROKERS="127.0.0.1:$port" cargo bench -p safeclock-intake --bench intake
