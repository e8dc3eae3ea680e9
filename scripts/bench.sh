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
eval "$(bash scripts/install-deps.sh)"

cargo bench -p safeclock-clock --bench engine
cargo bench -p safeclock-escalator --bench delivery
cargo bench -p safeclock-exporter --bench recorder

# One Apache Kafka node for every benchmark that needs a broker, so their figures compare.
started=$(KAFKA_LIBS="$SAFECLOCK_KAFKA_LIBS" bash scripts/kafka/start.sh -n 1 --partitions 3 --daemon --max-lifetime 7200)
kafka_dir=$(sed -n 's/^dir=//p' <<<"$started")
trap 'bash scripts/kafka/start.sh --stop "$kafka_dir" >/dev/null 2>&1 || true' EXIT
SAFECLOCK_TEST_BROKERS=$(sed -n 's/^bootstrap=//p' <<<"$started")
export SAFECLOCK_TEST_BROKERS
port=${SAFECLOCK_TEST_BROKERS##*:}
cargo bench -p safeclock-tests --bench e2e
cargo bench -p safeclock-tests --bench escalator
cargo bench -p safeclock-intake --bench intake
