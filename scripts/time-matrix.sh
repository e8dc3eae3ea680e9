#!/usr/bin/env bash
# The time-sensitive suites run at chosen instants instead of whenever they happen to run, to
# show that no test depends on the date or hour: each instant is injected as SAFECLOCK_TEST_NOW,
# which shifts the clock of the tests and of every service they start (`[time] offset_secs`).
# The instants cover the hours where working-day and 24-hour timescales change answer: just after
# midnight on a weekday (the hour a CI run once failed), a Friday evening, a weekend night, the
# eve of a bank holiday, a Monday morning after one, and the night the clocks go forward.
#
#   bash scripts/time-matrix.sh                     # every instant, the default suites
#   INSTANTS="2026-12-04T18:30:00Z" bash scripts/time-matrix.sh
#   SUITES="-p safeclock --test fault_suite" bash scripts/time-matrix.sh
#
# Prints one line per instant and suite, and exits non-zero if any failed.
set -euo pipefail
cd "$(dirname "$0")/.."

instants=${INSTANTS:-"2026-12-02T00:38:00Z 2026-12-04T18:30:00Z 2026-12-05T23:30:00Z 2026-12-24T23:30:00Z 2026-12-29T08:45:00Z 2027-03-28T00:30:00Z"}
# Each entry: cargo test arguments of one suite, separated by ';'.
suites=${SUITES:-"-p safeclock --test fault_suite;-p safeclock --test crash_recovery;-p safeclock-tests --test real_broker;-p safeclock-tests --test scale_out;-p safeclock-tests --test dead_letters;-p safeclock-tests --test exporter_scale_out;-p safeclock-tests --test escalator;-p safeclock-clock;-p safeclock-intake"}

eval "$(bash scripts/install-deps.sh)"
IFS=';' read -r -a suite_list <<<"$suites"
for suite in "${suite_list[@]}"; do
  # shellcheck disable=SC2086
  cargo test $suite --no-run --quiet
done

source scripts/services.sh
trap 'stop_services $?' EXIT INT TERM
start_services

failed=0
results=()
for instant in $instants; do
  for suite in "${suite_list[@]}"; do
    started=$(date +%s)
    # shellcheck disable=SC2086
    if SAFECLOCK_TEST_NOW="$instant" cargo test $suite --quiet >"/tmp/time-matrix.$$.log" 2>&1; then
      outcome=passed
    else
      outcome=FAILED
      failed=$((failed + 1))
      tail -n 40 "/tmp/time-matrix.$$.log" >&2
    fi
    line="$instant  $outcome  $(( $(date +%s) - started )) s  cargo test $suite"
    printf '[time-matrix] %s\n' "$line" >&2
    results+=("$line")
  done
done
rm -f "/tmp/time-matrix.$$.log"
printf '\n%s\n' "${results[@]}"
[ "$failed" -eq 0 ]
