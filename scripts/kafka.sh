#!/usr/bin/env bash
# An Apache Kafka broker for tests, benchmarks and the reliability suite: a
# pinned release assembled from Maven Central (org.apache.kafka:kafka_2.13 with
# its runtime dependencies and a log4j2 binding) into a cache outside the
# repository, run as a single-node KRaft broker and controller on 127.0.0.1.
#
# Usage: scripts/kafka.sh fetch                       download into the cache (once)
#        scripts/kafka.sh start [--port P] [--data DIR]
#                                                     start and wait until it answers a
#                                                     metadata request; without --data the
#                                                     storage is new each start (under
#                                                     target/kafka-P), with --data DIR it
#                                                     is kept across restarts (durable)
#        scripts/kafka.sh stop [--port P]             clean shutdown (SIGTERM, SIGKILL after 30 s)
#        scripts/kafka.sh status [--port P]           exit 0 when it answers
#
# The controller listens on P+1. Needs Java 17+ and Maven (mvn); the first fetch
# takes about a minute, later starts reuse the cache and need no network.
# Environment: KAFKA_VERSION (default below), BRIGHTER_CACHE (default
# ${XDG_CACHE_HOME:-~/.cache}/brighter-rs), KAFKA_HEAP (default 1g).
set -euo pipefail

KAFKA_VERSION=${KAFKA_VERSION:-4.1.1}
LOG4J_VERSION=2.25.3
SLF4J_VERSION=2.0.17
CACHE=${BRIGHTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/brighter-rs}
HOME_DIR="$CACHE/kafka-$KAFKA_VERSION"
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)

say() { printf '==> %s\n' "$*" >&2; }

have_java() { command -v java >/dev/null 2>&1 && command -v mvn >/dev/null 2>&1; }

fetch() {
    if [ -f "$HOME_DIR/.complete" ]; then return 0; fi
    have_java || { echo "error: Apache Kafka needs java and mvn on PATH" >&2; return 1; }
    say "fetching Apache Kafka $KAFKA_VERSION from Maven Central into $HOME_DIR (about a minute, once)"
    mkdir -p "$HOME_DIR"
    cat > "$HOME_DIR/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.brighter</groupId><artifactId>kafka-broker</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$KAFKA_VERSION</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId><version>$SLF4J_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId><version>$LOG4J_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>$LOG4J_VERSION</version></dependency>
  </dependencies>
</project>
EOF
    rm -rf "$HOME_DIR/libs"
    mvn -q -B -Dstyle.color=never -f "$HOME_DIR/pom.xml" dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$HOME_DIR/libs" >&2
    cat > "$HOME_DIR/log4j2.yaml" <<'EOF'
Configuration:
  Appenders:
    Console:
      name: STDOUT
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Logger:
      - name: kafka
        level: INFO
      - name: org.apache.kafka
        level: WARN
    Root:
      level: WARN
      AppenderRef:
        - ref: STDOUT
EOF
    touch "$HOME_DIR/.complete"
}

# Sends a Metadata v4 request (all topics) and checks the answer names the
# broker at 127.0.0.1: the broker is up and serving, not just listening.
answers() {
    local port=$1 reply
    reply=$( (exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
        printf '\x00\x00\x00\x14\x00\x03\x00\x04\x00\x00\x00\x01\x00\x05probe\xff\xff\xff\xff\x00' >&3
        timeout 3 head -c 40 <&3 | tr -c '0-9.' ' ') 2>/dev/null) || return 1
    [[ "$reply" == *127.0.0.1* ]]
}

data_dir() { echo "${DATA:-$REPO_ROOT/target/kafka-$PORT}"; }

start() {
    fetch
    if answers "$PORT"; then say "a Kafka broker already answers on 127.0.0.1:$PORT"; return 0; fi
    local dir; dir=$(data_dir)
    if [ -z "$DATA" ]; then rm -rf "$dir"; fi
    mkdir -p "$dir/logs"
    local controller=$((PORT + 1))
    cat > "$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$controller
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$controller
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$controller
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/logs
num.partitions=1
default.replication.factor=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
EOF
    local cp="$HOME_DIR/libs/*"
    if [ ! -f "$dir/logs/meta.properties" ]; then
        java -cp "$cp" kafka.tools.StorageTool format --standalone --ignore-formatted \
            -t "$(java -cp "$cp" kafka.tools.StorageTool random-uuid)" \
            -c "$dir/server.properties" > "$dir/format.log" 2>&1 \
            || { cat "$dir/format.log" >&2; return 1; }
    fi
    local log="$dir/kafka.log"
    say "starting Apache Kafka $KAFKA_VERSION (KRaft) on 127.0.0.1:$PORT; storage $dir/logs; log $log"
    nohup java -Xms256m -Xmx"${KAFKA_HEAP:-1g}" -XX:+UseG1GC -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$HOME_DIR/log4j2.yaml" \
        -cp "$cp" kafka.Kafka "$dir/server.properties" >> "$log" 2>&1 < /dev/null &
    echo $! > "$dir/kafka.pid"
    for _ in $(seq 1 120); do
        if answers "$PORT"; then say "Apache Kafka $KAFKA_VERSION answers on 127.0.0.1:$PORT"; return 0; fi
        if ! kill -0 "$(cat "$dir/kafka.pid")" 2>/dev/null; then
            tail -n 30 "$log" >&2; echo "error: Apache Kafka exited while starting; see $log" >&2; return 1
        fi
        sleep 0.5
    done
    echo "error: Apache Kafka did not answer on 127.0.0.1:$PORT within 60 s; see $log" >&2
    return 1
}

stop() {
    local dir; dir=$(data_dir)
    local pidfile="$dir/kafka.pid"
    [ -f "$pidfile" ] || { say "no Apache Kafka started here on port $PORT"; return 0; }
    local pid; pid=$(cat "$pidfile")
    if kill -TERM "$pid" 2>/dev/null; then
        for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

command=${1:-}; shift || true
PORT=9092
DATA=""
while [ $# -gt 0 ]; do
    case $1 in
        --port) PORT=$2; shift 2 ;;
        --data) DATA=$2; shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
case $command in
    fetch) fetch ;;
    start) start ;;
    stop) stop ;;
    status) answers "$PORT" ;;
    *) sed -n '2,20p' "$0" >&2; exit 2 ;;
esac
