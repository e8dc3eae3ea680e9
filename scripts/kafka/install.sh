#!/usr/bin/env bash
# install.sh - fetch a pinned Apache Kafka 4.x broker + tools from Maven
# artifacts into a per-version cache, smoke-test it, print the classpath dir.
#
#   ./install.sh            -> last line: /root/.cache/safeclock/kafka-4.4.0/libs
#   KAFKA_VERSION=4.3.1 ./install.sh
#
# Env:
#   KAFKA_VERSION   pinned Kafka version (default 4.4.0)
#   SAFECLOCK_CACHE cache root (default ${XDG_CACHE_HOME:-~/.cache}/safeclock)
#   KAFKA_M2_REPO   Maven local repo to use (default: a temp dir under the cache,
#                   deleted afterwards, so the cache holds only libs/)
#   KAFKA_SMOKE=0   skip the one-node start-up check (and the CDS archive)
#   KAFKA_INSTALL_TIMEOUT  bound for the Maven fetch, seconds (default 900)
#
# Layout of the cache dir ~/.cache/safeclock/kafka-<version>/:
#   libs/                 every runtime jar (java -cp 'libs/*')
#   probe/ReadyProbe.class readiness probe used by start.sh
#   cds-<jvm>.jsa         AppCDS archive of a broker start (faster JVM start)
#   .installed            stamp: a re-run with the same inputs is a no-op
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VERSION=${KAFKA_VERSION:-4.4.0}
CACHE_ROOT=${SAFECLOCK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/safeclock}
DIR=$CACHE_ROOT/kafka-$VERSION
LIBS=$DIR/libs
TIMEOUT=${KAFKA_INSTALL_TIMEOUT:-900}

log() { echo "install-kafka: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for tool in java javac mvn sha256sum timeout; do
  command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found on PATH"
done
case $VERSION in 4.*) ;; *) die "KAFKA_VERSION=$VERSION: this recipe is for Kafka 4.x (KRaft, log4j2)";; esac

# Everything that decides the content of the cache goes into the stamp.
JVM_ID=$(java -version 2>&1 | cksum | cut -d' ' -f1)
INPUTS=$(cat "$HERE/pom.xml" "$HERE/ReadyProbe.java" | sha256sum | cut -c1-16)
STAMP="version=$VERSION inputs=$INPUTS"

mkdir -p "$DIR"
exec 9>"$DIR/.lock"
if command -v flock >/dev/null 2>&1; then
  flock -w "$TIMEOUT" 9 || die "timed out waiting for another install of $DIR"
fi

if [[ -f $DIR/.installed && $(cat "$DIR/.installed") == "$STAMP" && -d $LIBS ]]; then
  log "kafka $VERSION already installed in $DIR"
  echo "$LIBS"
  exit 0
fi

START=$(date +%s)
TMP=$(mktemp -d "$DIR/.tmp.XXXXXX")
cleanup() {
  local rc=$?
  rm -rf "$TMP"
  # a failed first install leaves nothing behind
  if [[ $rc != 0 && ! -f $DIR/.installed ]]; then rm -rf "$DIR"; fi
}
trap cleanup EXIT
M2=${KAFKA_M2_REPO:-$TMP/m2}

fetch() { # $1 = extra maven args
  # -C: strict checksums, a bad SHA-1/MD5 fails the build instead of warning.
  # shellcheck disable=SC2086
  timeout "$TIMEOUT" mvn -B -q -C -Dstyle.color=never -f "$HERE/pom.xml" \
    -Dmaven.repo.local="$M2" -Dkafka.version="$VERSION" $1 \
    dependency:copy-dependencies -DincludeScope=runtime \
    -DoutputDirectory="$TMP/libs" >"$TMP/mvn.log" 2>&1 \
    || { tail -40 "$TMP/mvn.log" >&2; die "maven fetch of kafka $VERSION failed (log above)"; }
}

log "fetching org.apache.kafka:kafka_2.13:$VERSION + kafka-tools + deps (checksums strict)"
fetch ""
# log4j-slf4j-impl must match the log4j-core that this Kafka version pulls in.
core=$(cd "$TMP/libs" && ls log4j-core-*.jar 2>/dev/null | sed 's/^log4j-core-//; s/\.jar$//')
bind=$(cd "$TMP/libs" && ls log4j-slf4j-impl-*.jar 2>/dev/null | sed 's/^log4j-slf4j-impl-//; s/\.jar$//')
[[ -n $core ]] || die "no log4j-core in the dependency set"
if [[ $core != "$bind" ]]; then
  log "log4j-core is $core, binding was $bind: refetching with -Dlog4j2.version=$core"
  rm -rf "$TMP/libs"
  fetch "-Dlog4j2.version=$core"
fi
for jar in "kafka_2.13-$VERSION.jar" "kafka-tools-$VERSION.jar" "kafka-clients-$VERSION.jar" \
           "log4j-slf4j-impl-$core.jar"; do
  [[ -f $TMP/libs/$jar ]] || die "missing $jar after fetch"
done

# The probe start.sh uses to wait for a produce to succeed.
mkdir -p "$TMP/probe"
javac -nowarn -d "$TMP/probe" -cp "$TMP/libs/*" "$HERE/ReadyProbe.java" \
  || die "cannot compile ReadyProbe.java"

# Move into place (libs/ must be at its final path before the CDS run, since
# the archive records the class path).
rm -rf "$LIBS" "$DIR/probe" "$DIR"/cds-*.jsa "$DIR/.installed"
mv "$TMP/libs" "$LIBS"
mv "$TMP/probe" "$DIR/probe"
log "fetched $(ls "$LIBS" | wc -l) jars, $(du -sh "$LIBS" | cut -f1), in $(( $(date +%s) - START ))s"

# Smoke test: one combined KRaft node must come up and take an acks=all
# produce. Its clean exit also writes an AppCDS archive that start.sh
# passes to every JVM (-XX:SharedArchiveFile), ~30-40% faster start-up.
if [[ ${KAFKA_SMOKE:-1} != 0 ]]; then
  log "smoke test: starting one KRaft node"
  out=$(KAFKA_LIBS="$LIBS" KAFKA_CDS_DUMP="$DIR/cds-$JVM_ID.jsa" \
        "$HERE/start.sh" -n 1 --smoke 2>"$TMP/smoke.err") \
    || { tail -30 "$TMP/smoke.err" >&2; die "smoke test failed: broker did not start"; }
  log "smoke test ok: $(echo "$out" | grep '^bootstrap=' || true)"
  [[ -f $DIR/cds-$JVM_ID.jsa ]] || log "warning: no CDS archive written (start-up will be slower)"
fi

echo "$STAMP" >"$DIR/.installed"
rm -rf "$TMP"
log "done in $(( $(date +%s) - START ))s; cache $(du -sh "$DIR" | cut -f1)"
echo "$LIBS"
