#!/usr/bin/env bash
# start.sh - start a throw-away Apache Kafka 4.x KRaft cluster on loopback.
#
# usage: start.sh [-n BROKERS] [--combined] [--dir DIR] [--keep]
#                       [--heap SIZE] [--partitions P] [--prop KEY=VALUE]...
#                       [--timeout SECS] [--max-lifetime SECS] [--daemon]
#        start.sh --stop DIR
#
#   -n 1 (default)  one node, process.roles=broker,controller
#   -n N (N >= 2)   one controller-only node (id 100) + N broker-only nodes
#                   (ids 1..N); --combined makes N broker,controller nodes instead
#   RF = min(3, N), min.insync.replicas = 2 when RF >= 3 (else 1), for
#   default.replication.factor and the offsets/transaction topics.
#
# Prints (stdout) one line per node, then
#   bootstrap=127.0.0.1:PORT,...
#   pids=PID,...
#   dir=DIR
#   ready_ms=MS total_ms=MS        (JVM launch -> acks=all produce acked; script start -> that)
# and then stays in the foreground until SIGINT/SIGTERM/SIGHUP (or
# --max-lifetime, default 3600 s), when it stops the brokers, then the
# controllers, and removes DIR (unless --keep or --dir was given).
# --daemon returns after printing; stop later with `start.sh --stop DIR`
# (a watchdog still stops everything after --max-lifetime).
#
# For fault tests, DIR holds per node: node-ID/{server.properties,run.sh,pid,
# logs/server.log,logs/stdout.log,data/}. Restart a killed node with
#   DIR/node-ID/run.sh &             (it execs the JVM and rewrites node-ID/pid)
# and DIR/cluster.env has BOOTSTRAP, BROKERS, CONTROLLERS, NODE_<id>_PORT.
#
# Env: KAFKA_LIBS (classpath dir; default: run install.sh),
#      KAFKA_JVM_OPTS (replaces the default GC/JIT flags below),
#      KAFKA_CLUSTER_ID (default: random).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
log() { echo "start-kafka: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
T_SCRIPT=$(now_ms)

N=1 COMBINED=0 DIR="" KEEP=0 HEAP=512m CTRL_HEAP=256m PARTITIONS=1
TIMEOUT=120 MAX_LIFETIME=3600 DAEMON=0 SMOKE=0 STOP_DIR="" PROPS=()
while [[ $# -gt 0 ]]; do
  case $1 in
    -n) N=$2; shift 2;;
    --combined) COMBINED=1; shift;;
    --dir) DIR=$2; KEEP=1; shift 2;;
    --keep) KEEP=1; shift;;
    --heap) HEAP=$2; shift 2;;
    --partitions) PARTITIONS=$2; shift 2;;
    --prop) PROPS+=("$2"); shift 2;;
    --timeout) TIMEOUT=$2; shift 2;;
    --max-lifetime) MAX_LIFETIME=$2; shift 2;;
    --daemon) DAEMON=1; shift;;
    --smoke) SMOKE=1; shift;;          # used by install.sh: start, check, stop
    --stop) STOP_DIR=$2; shift 2;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0;;
    *) die "unknown argument: $1 (see --help)";;
  esac
done

# ---------------------------------------------------------------- stopping --
# pid of a node only if that process is still ours (guards against pid reuse):
# its command line names the node dir - as "setsid .../run.sh", "bash .../run.sh"
# for the moment before run.sh execs java, then as java's server.properties.
node_pid() { # $1 = node dir
  local pid
  pid=$(cat "$1/pid" 2>/dev/null) || return 1
  [[ -n $pid ]] && tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF "$1/" || return 1
  echo "$pid"
}

stop_nodes() { # $1 = cluster dir, $2.. = node ids; SIGTERM, bounded wait, SIGKILL
  local dir=$1 id pid pids=()
  shift
  for id in "$@"; do
    pid=$(node_pid "$dir/node-$id") || continue
    kill -CONT "$pid" 2>/dev/null || true   # a SIGSTOPped JVM cannot act on TERM
    kill -TERM "$pid" 2>/dev/null || true
    pids+=("$pid")
  done
  for _ in $(seq 1 300); do                 # 30 s
    local alive=0
    for pid in ${pids[@]+"${pids[@]}"}; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [[ $alive == 0 ]] && return 0
    sleep 0.1
  done
  for pid in ${pids[@]+"${pids[@]}"}; do kill -KILL "$pid" 2>/dev/null || true; done
}

stop_cluster() { # $1 = cluster dir
  local dir=$1 BROKERS="" CONTROLLERS="" WATCHDOG_PID=""
  [[ -f $dir/cluster.env ]] || return 0
  # shellcheck disable=SC1091
  source "$dir/cluster.env"
  # the watchdog goes first, so it cannot race us (and remove the dir)
  if [[ -n $WATCHDOG_PID && $WATCHDOG_PID != "${BASHPID:-}" ]]; then
    kill "$WATCHDOG_PID" 2>/dev/null || true
  fi
  touch "$dir/.stopped"
  # brokers first: their controlled shutdown needs a live controller
  # shellcheck disable=SC2086  # (id lists are meant to split)
  stop_nodes "$dir" $BROKERS
  stop_nodes "$dir" $CONTROLLERS
}

if [[ -n $STOP_DIR ]]; then
  [[ -f $STOP_DIR/cluster.env ]] || die "$STOP_DIR is not a start.sh cluster dir"
  STOP_DIR=$(cd "$STOP_DIR" && pwd)
  stop_cluster "$STOP_DIR"
  if [[ ! -f $STOP_DIR/.keep ]]; then rm -rf "$STOP_DIR"; fi
  log "stopped $STOP_DIR"
  exit 0
fi

# ---------------------------------------------------------------- setup ----
[[ $N =~ ^[1-9][0-9]*$ ]] || die "-n wants a positive number"
command -v java >/dev/null || die "java not found"
if [[ -z ${KAFKA_LIBS:-} ]]; then
  KAFKA_LIBS=$("$HERE/install.sh" | tail -1) || die "install.sh failed"
fi
[[ -f $(ls "$KAFKA_LIBS"/kafka_2.13-*.jar 2>/dev/null | head -1) ]] || die "no kafka_2.13 jar in $KAFKA_LIBS"
CACHE_DIR=$(dirname "$KAFKA_LIBS")
JVM_ID=$(java -version 2>&1 | cksum | cut -d' ' -f1)
CDS=$CACHE_DIR/cds-$JVM_ID.jsa

if [[ -z $DIR ]]; then
  DIR=$(mktemp -d "${TMPDIR:-/tmp}/safeclock-kafka.XXXXXX")
else
  mkdir -p "$DIR"
  [[ -z $(ls -A "$DIR") ]] || die "--dir $DIR is not empty"
fi
DIR=$(cd "$DIR" && pwd)
[[ $KEEP == 1 ]] && touch "$DIR/.keep"

# JVM flags. SerialGC + C1-only start ~30% faster and use fewer threads on 2
# shared cores; the AppCDS archive written by install.sh cuts more.
JVM_TUNING=${KAFKA_JVM_OPTS:--XX:+UseSerialGC -XX:TieredStopAtLevel=1}
JVM_COMMON="$JVM_TUNING -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true"
if [[ -f $CDS && -z ${KAFKA_CDS_DUMP:-} ]]; then JVM_COMMON+=" -XX:SharedArchiveFile=$CDS"; fi
TOOL_LOG4J=$HERE/log4j2-tools.xml
# short-lived JVMs (storage format, readiness probe)
TOOL_JVM="-Xmx256m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
[[ -f $CDS ]] && TOOL_JVM+=" -XX:SharedArchiveFile=$CDS"

# free loopback ports below the ephemeral range (32768+), so outgoing
# connections never take them between the check and the bind
USED_PORTS=" "
pick_port() { # sets PORT
  local p
  for _ in $(seq 1 500); do
    p=$(( 20000 + (RANDOM * 32768 + RANDOM) % 12000 ))
    [[ $USED_PORTS == *" $p "* ]] && continue
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then continue; fi
    USED_PORTS+="$p "; PORT=$p; return 0
  done
  die "no free loopback port found"
}

if [[ $N == 1 || $COMBINED == 1 ]]; then
  BROKERS=$(seq -s' ' 1 "$N"); CONTROLLERS=$BROKERS; ALL=$BROKERS
else
  BROKERS=$(seq -s' ' 1 "$N"); CONTROLLERS=100; ALL="$BROKERS $CONTROLLERS"
fi
RF=$(( N < 3 ? N : 3 )); MIN_ISR=$(( RF >= 3 ? 2 : 1 ))

declare -A PPORT CPORT
VOTERS=""
for id in $ALL; do
  if [[ " $BROKERS " == *" $id "* ]]; then pick_port; PPORT[$id]=$PORT; fi
  if [[ " $CONTROLLERS " == *" $id "* ]]; then
    pick_port; CPORT[$id]=$PORT; VOTERS+="${VOTERS:+,}$id@127.0.0.1:$PORT"
  fi
done
BOOTSTRAP=""
for id in $BROKERS; do BOOTSTRAP+="${BOOTSTRAP:+,}127.0.0.1:${PPORT[$id]}"; done

random_uuid() { # what `kafka-storage random-uuid` prints: 16 random bytes, base64url, no padding
  local u
  while :; do
    u=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
    [[ $u == -* ]] || { echo "$u"; return; }   # Kafka avoids a leading '-'
  done
}
CLUSTER_ID=${KAFKA_CLUSTER_ID:-$(random_uuid)}
[[ $CLUSTER_ID =~ ^[A-Za-z0-9_-]{22}$ ]] || die "could not make a cluster id (got '$CLUSTER_ID')"

for id in $ALL; do
  nd=$DIR/node-$id
  mkdir -p "$nd/data" "$nd/logs"
  is_b=0 is_c=0
  [[ " $BROKERS " == *" $id "* ]] && is_b=1
  [[ " $CONTROLLERS " == *" $id "* ]] && is_c=1
  {
    sed -e "s#@DATA_DIR@#$nd/data#" -e "s#@PARTITIONS@#$PARTITIONS#" \
        -e "s#@RF@#$RF#" -e "s#@MIN_ISR@#$MIN_ISR#" "$HERE/server.properties.in"
    echo
    echo "# ---- role: broker=$is_b controller=$is_c (start.sh)"
    echo "node.id=$id"
    # static quorum (kraft.version 0): every node is formatted with no
    # --standalone/--initial-controllers flag, which 4.x then refuses
    echo "controller.quorum.voters=$VOTERS"
    echo "controller.listener.names=CONTROLLER"
    echo "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    if [[ $is_b == 1 && $is_c == 1 ]]; then
      echo "process.roles=broker,controller"
      echo "listeners=PLAINTEXT://127.0.0.1:${PPORT[$id]},CONTROLLER://127.0.0.1:${CPORT[$id]}"
    elif [[ $is_b == 1 ]]; then
      echo "process.roles=broker"
      echo "listeners=PLAINTEXT://127.0.0.1:${PPORT[$id]}"
    else
      echo "process.roles=controller"
      echo "listeners=CONTROLLER://127.0.0.1:${CPORT[$id]}"
    fi
    if [[ $is_b == 1 ]]; then
      echo "advertised.listeners=PLAINTEXT://127.0.0.1:${PPORT[$id]}"
      echo "inter.broker.listener.name=PLAINTEXT"
    fi
    if [[ ${#PROPS[@]} -gt 0 ]]; then
      echo "# ---- --prop overrides"
      printf '%s\n' "${PROPS[@]}"
    fi
  } >"$nd/server.properties"

  heap=$HEAP; [[ $is_b == 0 ]] && heap=$CTRL_HEAP
  extra=""
  if [[ -n ${KAFKA_CDS_DUMP:-} && $id == 1 ]]; then extra="-XX:ArchiveClassesAtExit=$KAFKA_CDS_DUMP.tmp"; fi
  cat >"$nd/run.sh" <<EOF
#!/usr/bin/env bash
# (re)start node $id: this process becomes its JVM, and its pid goes to ./pid
# (so after SIGKILL, restart it with:  $nd/run.sh &)
cd "$nd"
echo \$\$ > "$nd/pid.tmp" && mv -f "$nd/pid.tmp" "$nd/pid"   # atomic: a reader never sees it empty
# own session, away from terminal signals - unless already a process-group
# leader (a job of an interactive shell), where setsid would fork a new pid
stat=\$(cat /proc/\$\$/stat); set -- \${stat##*) }
SS=""; if command -v setsid >/dev/null && [[ \$3 != \$\$ ]]; then SS=setsid; fi
exec \$SS java -Xmx$heap $JVM_COMMON $extra \\
  -Dlog4j2.configurationFile="$HERE/log4j2.xml" -Dkafka.logs.dir="$nd/logs" \\
  -cp "$KAFKA_LIBS/*" kafka.Kafka "$nd/server.properties" >>"$nd/logs/stdout.log" 2>&1
EOF
  chmod +x "$nd/run.sh"

done

# format every node's storage (in parallel; same cluster id, static quorum so
# no --standalone/--initial-controllers)
declare -A FMT_PID
for id in $ALL; do
  nd=$DIR/node-$id
  # shellcheck disable=SC2086
  java $TOOL_JVM -Dlog4j2.configurationFile="$TOOL_LOG4J" -cp "$KAFKA_LIBS/*" \
    kafka.tools.StorageTool format --config "$nd/server.properties" --cluster-id "$CLUSTER_ID" \
    >"$nd/logs/format.log" 2>&1 &
  FMT_PID[$id]=$!
done
FMT_FAILED=""
for id in $ALL; do   # wait for every one, so none outlives a failure
  wait "${FMT_PID[$id]}" || { FMT_FAILED+=" $id"; cat "$DIR/node-$id/logs/format.log" >&2; }
done
if [[ -n $FMT_FAILED ]]; then
  [[ $KEEP == 1 ]] || rm -rf "$DIR"
  die "storage format failed for node(s)$FMT_FAILED"
fi

{
  echo "KAFKA_DIR=$DIR"
  echo "BOOTSTRAP=$BOOTSTRAP"
  echo "BROKERS=\"$BROKERS\""
  echo "CONTROLLERS=\"$CONTROLLERS\""
  echo "CLUSTER_ID=$CLUSTER_ID"
  echo "KAFKA_LIBS=$KAFKA_LIBS"
  for id in $ALL; do
    [[ -n ${PPORT[$id]:-} ]] && echo "NODE_${id}_PORT=${PPORT[$id]}"
    [[ -n ${CPORT[$id]:-} ]] && echo "NODE_${id}_CONTROLLER_PORT=${CPORT[$id]}"
  done
} >"$DIR/cluster.env"

# ---------------------------------------------------------------- launch ---
declare -A LAUNCH_PID
cleanup_and_exit() {
  trap '' INT TERM HUP
  stop_cluster "$DIR"
  for id in "${!LAUNCH_PID[@]}"; do   # one that had not yet written ./pid
    launched_alive "$id" && kill -KILL "${LAUNCH_PID[$id]}" 2>/dev/null || true
  done
  if [[ -n ${KAFKA_CDS_DUMP:-} && -s $KAFKA_CDS_DUMP.tmp ]]; then mv "$KAFKA_CDS_DUMP.tmp" "$KAFKA_CDS_DUMP"; fi
  rm -f "${KAFKA_CDS_DUMP:-/nonexistent}.tmp"
  [[ $KEEP == 1 ]] || rm -rf "$DIR"
  exit "${1:-0}"
}
trap 'cleanup_and_exit 1' INT TERM HUP

T0=$(now_ms)
# controllers first so brokers find the quorum at once
for id in $CONTROLLERS $BROKERS; do
  [[ -n ${LAUNCH_PID[$id]:-} ]] && continue   # combined node already up
  "$DIR/node-$id/run.sh" </dev/null >/dev/null 2>&1 &
  LAUNCH_PID[$id]=$!               # = run.sh's pid = the JVM's (exec, no fork); run.sh writes ./pid
done
# alive during start-up: our own child, so its pid cannot be reused before we reap it; a
# zombie counts as dead. (node_pid's command-line check would race the child's exec.)
launched_alive() { # $1 = node id
  local st
  st=$(cat "/proc/${LAUNCH_PID[$1]}/stat" 2>/dev/null) || return 1
  st=${st##*) }
  [[ ${st%% *} != Z ]]
}

# watchdog: bounds the cluster's life even if this script is SIGKILLed
PARENT=$$
(
  trap '' INT HUP
  trap 'exit 0' TERM
  deadline=$(( $(date +%s) + MAX_LIFETIME ))
  while [[ $(date +%s) -lt $deadline && ! -f $DIR/.stopped ]]; do
    if [[ $DAEMON == 0 ]] && ! kill -0 "$PARENT" 2>/dev/null; then break; fi
    sleep 2
  done
  [[ -d $DIR && ! -f $DIR/.stopped ]] || exit 0   # someone else stopped it
  stop_cluster "$DIR"
  if [[ ! -f $DIR/.keep ]]; then rm -rf "$DIR"; fi
) </dev/null >/dev/null 2>&1 &
echo "WATCHDOG_PID=$!" >>"$DIR/cluster.env"

# readiness: all brokers registered + an acks=all produce acknowledged
# (class path: libs/* first, so the CDS archive, dumped with exactly libs/*, applies)
PROBE_CP="$KAFKA_LIBS/*:$CACHE_DIR/probe"
PROBE=(ReadyProbe)
PROBE_JVM=$TOOL_JVM
if [[ ! -f $CACHE_DIR/probe/ReadyProbe.class ]]; then  # source launcher wants explicit jars
  PROBE_CP=$(printf '%s:' "$KAFKA_LIBS"/*.jar); PROBE=("$HERE/ReadyProbe.java")
fi
# shellcheck disable=SC2086
timeout $(( TIMEOUT + 30 )) java $PROBE_JVM -Dlog4j2.configurationFile="$TOOL_LOG4J" \
  -cp "$PROBE_CP" "${PROBE[@]}" "$BOOTSTRAP" "$N" $(( TIMEOUT * 1000 )) >/dev/null 2>"$DIR/probe.err" &
PROBE_PID=$!
ready=0 dead=""
while kill -0 "$PROBE_PID" 2>/dev/null; do        # fail fast if a node dies
  for id in $ALL; do launched_alive "$id" || dead+=" $id"; done
  [[ -n $dead ]] && { kill "$PROBE_PID" 2>/dev/null || true; break; }
  sleep 0.2
done
if [[ -z $dead ]] && wait "$PROBE_PID"; then ready=1; fi
if [[ $ready == 0 ]]; then
  cat "$DIR/probe.err" >&2
  [[ -n $dead ]] && log "node(s)$dead exited during start-up"
  for id in $ALL; do
    log "--- node $id: tail of logs"; tail -n 15 "$DIR/node-$id/logs/server.log" "$DIR/node-$id/logs/stdout.log" >&2 2>/dev/null || true
  done
  KEEP=1
  if [[ -n $dead ]]; then log "cluster failed to start; kept $DIR for inspection"
  else log "cluster not ready within ${TIMEOUT}s; kept $DIR for inspection"; fi
  cleanup_and_exit 1
fi
READY_MS=$(( $(now_ms) - T0 ))

PIDS=""
for id in $ALL; do
  role=broker
  if [[ " $CONTROLLERS " == *" $id "* ]]; then
    role=controller; [[ " $BROKERS " == *" $id "* ]] && role=broker,controller
  fi
  pid=${LAUNCH_PID[$id]}
  PIDS+="${PIDS:+,}$pid"
  echo "node=$id role=$role port=${PPORT[$id]:-} controller_port=${CPORT[$id]:-} pid=$pid"
done
echo "bootstrap=$BOOTSTRAP"
echo "pids=$PIDS"
echo "dir=$DIR"
echo "ready_ms=$READY_MS total_ms=$(( $(now_ms) - T_SCRIPT ))"

if [[ $SMOKE == 1 ]]; then cleanup_and_exit 0; fi
if [[ $DAEMON == 1 ]]; then trap - INT TERM HUP; exit 0; fi

# foreground: wait for a signal or the lifetime bound
deadline=$(( $(date +%s) + MAX_LIFETIME ))
while [[ $(date +%s) -lt $deadline ]]; do
  sleep 1 &
  wait $! || true
done
log "max lifetime ${MAX_LIFETIME}s reached, stopping"
cleanup_and_exit 0
