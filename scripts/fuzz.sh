#!/usr/bin/env bash
# Property-based fuzzing of the parsers hostile input reaches: the intake body parser, the
# referral-event decoder (with plausibility checks) and the rule parser
# (services/intake/tests/fuzz.rs, proptest on stable Rust). Runs many cases per property,
# bounded in time; exits non-zero on any failure, printing proptest's minimal failing input
# (failures are also persisted under services/intake/proptest-regressions/ to re-run first).
#
#   bash scripts/fuzz.sh                      # 20,000 cases per property, at most 10 minutes
#   PROPTEST_CASES=200000 FUZZ_SECONDS=3600 bash scripts/fuzz.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cases="${PROPTEST_CASES:-20000}"
seconds="${FUZZ_SECONDS:-600}"
printf '[fuzz] %s cases per property, at most %s s\n' "$cases" "$seconds" >&2
cargo test --release -p safeclock-intake --test fuzz --no-run --quiet
status=0
PROPTEST_CASES="$cases" timeout --signal=INT "$seconds" \
  cargo test --release -p safeclock-intake --test fuzz --quiet || status=$?
if [ "$status" -eq 124 ]; then
  printf '[fuzz] time budget reached with no failure so far\n' >&2
  exit 0
fi
exit "$status"
