#!/usr/bin/env bash
# The fault suite on its own (services/cli/tests/fault_suite.rs): every service as real
# processes on an Apache Kafka cluster of its own (a controller and three brokers), with faults injected at random points and the invariants
# checked after each run. scripts/test.sh (CI) runs it once as part of the workspace tests; this
# script runs it longer, with more rounds of faults per run and more runs, each bounded in time.
# Reports go to target/fault-suite/run-N.md; a failing run keeps its logs and broker data (the
# path is printed) and makes the script exit non-zero.
#
#   bash scripts/faults.sh                          # 3 runs of 1 round each
#   RUNS=10 ROUNDS=3 bash scripts/faults.sh
#   SEED=8857340441602068547 RUNS=1 bash scripts/faults.sh   # replay a run
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${RUNS:-3}"
rounds="${ROUNDS:-1}"
per_run_seconds="${RUN_SECONDS:-900}"
eval "$(bash scripts/install-deps.sh)"
export SAFECLOCK_KAFKA_LIBS
cargo test -p safeclock --test fault_suite --no-run --quiet
mkdir -p target/fault-suite
failed=0
for run in $(seq 1 "$runs"); do
  printf '[faults] run %s of %s (%s round(s) of faults)\n' "$run" "$runs" "$rounds" >&2
  report="$PWD/target/fault-suite/run-$run.md"
  if ! SAFECLOCK_FAULT_ROUNDS="$rounds" SAFECLOCK_FAULT_REPORT="$report" \
    SAFECLOCK_FAULT_SEED="${SEED:-}" timeout "$per_run_seconds" \
    cargo test -p safeclock --test fault_suite --quiet -- --nocapture; then
    failed=$((failed + 1))
    printf '[faults] run %s FAILED\n' "$run" >&2
  fi
  [ -f "$report" ] && cat "$report" >&2
done
printf '[faults] %s of %s runs passed; reports in target/fault-suite/\n' "$((runs - failed))" "$runs" >&2
[ "$failed" -eq 0 ]
