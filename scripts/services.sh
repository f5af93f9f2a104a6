# Sourced by scripts/test and scripts/bench: installs and starts, where they are
# missing, what the tests and benchmarks need: PostgreSQL and RabbitMQ (Debian
# packages), cmake and libcurl headers (librdkafka is built from source), a
# Kafka-protocol broker on 127.0.0.1:9092 (tansu from crates.io unless one
# answers there) and cargo-nextest.

log() { printf '\n==> %s\n' "$*"; }

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
APT_UPDATED=0
apt_install() {
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
    $SUDO rabbitmq-server -detached || true
    wait_for_port 5672 RabbitMQ 120
}

ensure_build_tools() {
    # rdkafka builds librdkafka from source (cmake-build), which includes curl headers.
    if command -v cmake >/dev/null 2>&1 && dpkg -s libcurl4-openssl-dev >/dev/null 2>&1; then return 0; fi
    log "installing cmake and libcurl4-openssl-dev (to build librdkafka)"
    apt_install cmake libcurl4-openssl-dev
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

ensure_kafka() {
    # A Kafka-protocol broker on 127.0.0.1:9092: Apache Kafka if one runs there
    # (docker compose up), else tansu, installed from crates.io when missing.
    if port_open 9092; then return 0; fi
    ensure_tansu_binary
    log "starting tansu on 127.0.0.1:9092 (in-memory storage)"
    mkdir -p target
    nohup "$TANSU" broker --listener-url tcp://127.0.0.1:9092 \
        --advertised-listener-url tcp://127.0.0.1:9092 \
        --storage-engine memory://tansu/ > target/tansu.log 2>&1 &
    wait_for_port 9092 tansu 60
}

ensure_cargo_deny() {
    if cargo deny --version >/dev/null 2>&1; then return 0; fi
    log "installing cargo-deny"
    cargo install cargo-deny --locked
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

ensure_nextest() {
    if cargo nextest --version >/dev/null 2>&1; then return 0; fi
    log "installing cargo-nextest"
    cargo install cargo-nextest --locked
}

# Every service, and the addresses the tests and benchmarks read.
ensure_services() {
    ensure_postgres
    ensure_rabbitmq
    ensure_build_tools
    ensure_kafka
    export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
    export AMQP_ADDR="${AMQP_ADDR:-amqp://guest:guest@127.0.0.1:5672/%2f}"
    export KAFKA_BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"
}
