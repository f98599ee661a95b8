#!/usr/bin/env bash
# Make sure the services the test-suite needs are available (idempotent).
#
#  * Redis at ${SAGALINE_TEST_REDIS_URL:-redis://127.0.0.1:6379/0} answers PING
#  * PostgreSQL at 127.0.0.1:5432 accepts `postgres` over TCP without a password
#  * database `sagaline_test` exists
#  * `initdb`/`pg_ctl` and `redis-server` binaries exist (chaos tests start
#    private servers); their locations are printed.
#  * RabbitMQ at 127.0.0.1:5672 (guest) answers and `rabbitmqctl` reaches it: the
#    suite adds a vhost of its own per session; chaos tests start private nodes.
#
# Missing binaries are installed with apt-get (redis-server postgresql); servers
# that are down are started. Quiet apart from the located binaries when all is
# fine. Every wait is bounded.
set -euo pipefail

REDIS_URL="${SAGALINE_TEST_REDIS_URL:-redis://127.0.0.1:6379/0}"
PG_HOST=127.0.0.1
PG_PORT=5432
PG_USER=postgres
TEST_DB=sagaline_test
WAIT_SECS="${SAGALINE_SERVICES_WAIT:-30}"

log() { echo "ensure-services: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        die "need root to run: $*"
    fi
}

APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not available; install $* manually"
    if [ "$APT_UPDATED" -eq 0 ]; then
        log "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        APT_UPDATED=1
    fi
    log "apt-get install -y $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

# wait_for <description> <command...> : retry once a second, at most WAIT_SECS times
wait_for() {
    local what=$1; shift
    local i
    for ((i = 0; i < WAIT_SECS; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    "$@" >/dev/null 2>&1 || die "timed out after ${WAIT_SECS}s waiting for $what"
}

# ---------------------------------------------------------------- Redis ----
# redis://[user:pass@]host[:port][/db]
rest="${REDIS_URL#*://}"
rest="${rest%%/*}"
rest="${rest##*@}"
REDIS_HOST="${rest%%:*}"
REDIS_PORT=6379
if [[ "$rest" == *:* ]]; then REDIS_PORT="${rest##*:}"; fi
[ -n "$REDIS_HOST" ] || REDIS_HOST=127.0.0.1

redis_ping() {
    # Speak RESP over bash's /dev/tcp: no redis-cli needed. -NOAUTH also means "up".
    timeout 3 bash -c '
        exec 3<>"/dev/tcp/$1/$2" || exit 1
        printf "PING\r\n" >&3
        IFS= read -r -t 2 line <&3 || exit 1
        case "$line" in "+PONG"*|"-NOAUTH"*) exit 0 ;; *) exit 1 ;; esac
    ' _ "$REDIS_HOST" "$REDIS_PORT" 2>/dev/null
}

find_redis_server() {
    command -v redis-server 2>/dev/null && return 0
    local c
    for c in /usr/bin/redis-server /usr/local/bin/redis-server /usr/sbin/redis-server; do
        if [ -x "$c" ]; then echo "$c"; return 0; fi
    done
    return 1
}

REDIS_BIN="$(find_redis_server || true)"
if [ -z "$REDIS_BIN" ]; then
    apt_install redis-server
    REDIS_BIN="$(find_redis_server || true)"
    [ -n "$REDIS_BIN" ] || die "redis-server still not found after install"
fi

if ! redis_ping; then
    case "$REDIS_HOST" in
        127.0.0.1|localhost|::1) ;;
        *) die "Redis at $REDIS_HOST:$REDIS_PORT unreachable (not local; not starting it)" ;;
    esac
    log "starting redis-server on 127.0.0.1:$REDIS_PORT"
    as_root "$REDIS_BIN" --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" \
        --save "" --appendonly no --dir /tmp >&2
    wait_for "redis at 127.0.0.1:$REDIS_PORT" redis_ping
fi
echo "redis-server: $REDIS_BIN"

# ----------------------------------------------------------- PostgreSQL ----
find_pg_bin() {
    local d
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        d="$(dirname "$(readlink -f "$(command -v initdb)")")"
        echo "$d"; return 0
    fi
    d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    if [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
        echo "$d"; return 0
    fi
    return 1
}

PG_BIN="$(find_pg_bin || true)"
if [ -z "$PG_BIN" ] || ! command -v psql >/dev/null 2>&1; then
    apt_install postgresql
    PG_BIN="$(find_pg_bin || true)"
    [ -n "$PG_BIN" ] || die "initdb/pg_ctl still not found after install"
    PG_INSTALLED=1
else
    PG_INSTALLED=0
fi
command -v psql >/dev/null 2>&1 || die "psql not found"

export PGCONNECT_TIMEOUT=3
pg_sql() { psql -X -q -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -v ON_ERROR_STOP=1 -Atc "$1"; }
pg_ok() { [ "$(pg_sql 'SELECT 1' 2>/dev/null)" = "1" ]; }
pg_port_open() { timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$PG_HOST" "$PG_PORT" 2>/dev/null; }

# Prepend trust rules for TCP/local access (only for clusters we installed/started).
pg_trust_hba() {
    local ver=$1 hba
    hba="$(as_root pg_conftool -s "$ver" main show hba_file 2>/dev/null || true)"
    [ -n "$hba" ] || hba="/etc/postgresql/$ver/main/pg_hba.conf"
    [ -f "$hba" ] || die "pg_hba.conf not found for cluster $ver/main"
    if ! grep -q '^# sagaline-trust' "$hba"; then
        log "enabling trust auth in $hba"
        local tmp
        tmp="$(mktemp)"
        {
            echo "# sagaline-trust: test machine, trust local connections"
            echo "local   all all              trust"
            echo "host    all all 127.0.0.1/32 trust"
            echo "host    all all ::1/128      trust"
            cat "$hba"
        } >"$tmp"
        as_root cp "$tmp" "$hba"
        rm -f "$tmp"
    fi
}

if ! pg_ok; then
    command -v pg_ctlcluster >/dev/null 2>&1 || apt_install postgresql-common
    PG_VER="$(basename "$(dirname "$PG_BIN")")"
    OWNED=$PG_INSTALLED
    if ! pg_port_open; then
        if ! pg_lsclusters -h 2>/dev/null | awk '{print $1, $2}' | grep -qx "$PG_VER main"; then
            log "creating cluster $PG_VER/main on port $PG_PORT"
            as_root pg_createcluster -p "$PG_PORT" "$PG_VER" main -- --auth=trust >&2
        fi
        pg_trust_hba "$PG_VER"
        log "starting PostgreSQL cluster $PG_VER/main"
        as_root pg_ctlcluster --skip-systemctl-redirect "$PG_VER" main start >&2 || true
        OWNED=1
        wait_for "PostgreSQL port $PG_HOST:$PG_PORT" pg_port_open
    elif [ "$OWNED" -eq 1 ]; then
        # freshly installed by us and auto-started by the package with default auth
        pg_trust_hba "$PG_VER"
        as_root pg_ctlcluster --skip-systemctl-redirect "$PG_VER" main reload >&2
    fi
    if [ "$OWNED" -eq 1 ]; then
        wait_for "PostgreSQL to accept user $PG_USER at $PG_HOST:$PG_PORT" pg_ok
    else
        pg_sql 'SELECT 1' >&2 || true
        die "PostgreSQL at $PG_HOST:$PG_PORT is up but user $PG_USER cannot log in without a password"
    fi
fi

if [ "$(pg_sql "SELECT 1 FROM pg_database WHERE datname = '$TEST_DB'")" != "1" ]; then
    log "creating database $TEST_DB"
    pg_sql "CREATE DATABASE $TEST_DB" >/dev/null
fi
echo "postgres bin: $PG_BIN"

# --- MariaDB (the MySQL flavour of the SQL store's conformance suite) ----------
MY_HOST=127.0.0.1
MY_PORT=${SAGALINE_TEST_MYSQL_PORT:-3306}
my_ok() {
    "$(dirname "$0")/../.venv/bin/python" - "$MY_HOST" "$MY_PORT" <<'PY' 2>/dev/null
import sys
import pymysql
pymysql.connect(host=sys.argv[1], port=int(sys.argv[2]), user="root", password="",
                connect_timeout=3).close()
PY
}
my_port_open() { timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$MY_HOST" "$MY_PORT" 2>/dev/null; }

if ! my_ok; then
    if ! command -v mariadbd >/dev/null 2>&1 && [ ! -x /usr/sbin/mariadbd ]; then
        apt_install mariadb-server
    fi
    if ! my_port_open; then
        log "starting MariaDB"
        as_root mkdir -p /run/mysqld
        as_root chown mysql:mysql /run/mysqld 2>/dev/null || true
        as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd \
            -- --user=mysql --bind-address=127.0.0.1 --port="$MY_PORT" >&2
        wait_for "MariaDB port $MY_HOST:$MY_PORT" my_port_open
    fi
    if ! my_ok; then
        # A fresh Debian install lets root in through the unix socket only.
        log "allowing root@localhost with an empty password over TCP"
        as_root mariadb -e "ALTER USER root@localhost IDENTIFIED VIA mysql_native_password \
            USING PASSWORD('') OR unix_socket; FLUSH PRIVILEGES;" >&2 || true
        wait_for "MariaDB to accept root at $MY_HOST:$MY_PORT" my_ok
    fi
fi
echo "mariadb: $MY_HOST:$MY_PORT"

# ------------------------------------------------------------- RabbitMQ ----
AMQP_HOST=127.0.0.1
AMQP_PORT=5672
amqp_port_open() { timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$AMQP_HOST" "$AMQP_PORT" 2>/dev/null; }
rabbit_ok() { as_root timeout 30 rabbitmqctl -q await_startup --timeout 25 >/dev/null 2>&1; }

if ! command -v rabbitmq-server >/dev/null 2>&1 && [ ! -x /usr/sbin/rabbitmq-server ]; then
    apt_install rabbitmq-server
fi
if ! amqp_port_open; then
    log "starting RabbitMQ"
    as_root rabbitmq-server -detached >&2
    wait_for "RabbitMQ port $AMQP_HOST:$AMQP_PORT" amqp_port_open
fi
rabbit_ok || die "RabbitMQ at $AMQP_HOST:$AMQP_PORT is up but rabbitmqctl cannot reach it"
echo "rabbitmq: $AMQP_HOST:$AMQP_PORT"

# --- NATS ----------------------------------------------------------------------
# The outbox tests start private nats-server instances (JetStream) of their own.
if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
    apt_install nats-server
fi
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || die "nats-server not found"
echo "nats-server: $(command -v nats-server || echo /usr/sbin/nats-server)"
