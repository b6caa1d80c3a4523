#!/usr/bin/env bash
# The tracking services of a LearnsItAll cluster, run on its head node: a PostgreSQL server
# with one database for MLflow and one for Optuna (both keep their schema version in a table
# named alembic_version, so they cannot share one), and an MLflow tracking server that stores
# runs in PostgreSQL and proxies artifact uploads and downloads to --artifacts.
#
# It prints the variables to export (and writes them to DATA_DIR/env):
#   eval "$(cluster/head_node.sh)"
#   lia run configs/quickstart.yaml
#   lia sweep configs/sweep_ewc.yaml 'sweep.storage=${oc.env:LIA_OPTUNA_STORAGE}'
# Running it again finds what the first run created or started and prints the same lines.
# Everything listens on 127.0.0.1 unless --host says otherwise: drivers submitted with
# `ray job submit` run on the head node, and they are the only processes that write MLflow and
# Optuna. The database password is generated once, kept in DATA_DIR (mode 600) and passed to
# MLflow through its environment, never on a command line.
#
# As root: initdb and postgres refuse to run as root, so the PostgreSQL commands run as the
# system user --pg-user (default postgres, which Debian's package creates) through runuser;
# that user must be able to reach DATA_DIR (the default, /var/lib/lia-head, is fine; a folder
# under /root is not). MLflow runs as the calling user.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: cluster/head_node.sh [options] [-- extra `mlflow server` options]
       cluster/head_node.sh --stop [--data-dir DIR]

Start (or find running) PostgreSQL and an MLflow tracking server for a LearnsItAll cluster,
then print the variables to export: MLFLOW_TRACKING_URI and LIA_OPTUNA_STORAGE (an Optuna
RDB URL; pass it as 'sweep.storage=${oc.env:LIA_OPTUNA_STORAGE}').

Options:
  --host ADDR        address both servers listen on (default 127.0.0.1; 0.0.0.0 = all)
  --advertise NAME   host name put in the printed URIs (default: --host, or this node's first
                     address when --host is 0.0.0.0)
  --port N           MLflow port (default 5000)
  --pg-port N        PostgreSQL port (default 5433: 5432 is often taken by a distribution's
                     own cluster)
  --data-dir DIR     state: database files, artifacts, logs, password, env file
                     (default $LIA_HEAD_DIR, else /var/lib/lia-head as root, else ~/lia-head)
  --artifacts DEST   where MLflow stores artifacts: a folder or a URI such as
                     s3://bucket/prefix (default DATA_DIR/mlflow/artifacts)
  --workers N        MLflow server worker processes (default 2)
  --timeout S        seconds to wait for each server to answer (default 120)
  --pg-bin DIR       folder of initdb/pg_ctl/psql (default: on PATH, else the newest
                     /usr/lib/postgresql/*/bin)
  --pg-user NAME     system user that runs PostgreSQL when this script runs as root
                     (default postgres)
  --stop             stop the MLflow server and PostgreSQL of DATA_DIR (their data stays)
  -h, --help         this help

Files in DATA_DIR: postgres/ (database cluster, socket, server.log), mlflow/ (pid, log,
artifacts), db_password, env (the export lines).
EOF
}

die() {
    echo "head_node.sh: $*" >&2
    exit 1
}
say() { echo "head_node.sh: $*" >&2; }

HOST=127.0.0.1
ADVERTISE=""
PORT=5000
PG_PORT=5433
DATA_DIR="${LIA_HEAD_DIR:-}"
ARTIFACTS=""
WORKERS=2
TIMEOUT=120
PG_BIN=""
PG_OS_USER=postgres
ACTION=start
EXTRA=()

while (($#)); do
    case "$1" in
        --host) HOST="${2:?--host needs an address}"; shift 2 ;;
        --advertise) ADVERTISE="${2:?--advertise needs a host name}"; shift 2 ;;
        --port) PORT="${2:?--port needs a number}"; shift 2 ;;
        --pg-port) PG_PORT="${2:?--pg-port needs a number}"; shift 2 ;;
        --data-dir) DATA_DIR="${2:?--data-dir needs a folder}"; shift 2 ;;
        --artifacts) ARTIFACTS="${2:?--artifacts needs a folder or URI}"; shift 2 ;;
        --workers) WORKERS="${2:?--workers needs a number}"; shift 2 ;;
        --timeout) TIMEOUT="${2:?--timeout needs seconds}"; shift 2 ;;
        --pg-bin) PG_BIN="${2:?--pg-bin needs a folder}"; shift 2 ;;
        --pg-user) PG_OS_USER="${2:?--pg-user needs a user name}"; shift 2 ;;
        --stop) ACTION=stop; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
done

for value in "$PORT" "$PG_PORT" "$WORKERS" "$TIMEOUT"; do
    [[ "$value" =~ ^[0-9]+$ ]] || die "expected a number, got '$value'"
done
if [[ -z "$DATA_DIR" ]]; then
    if ((EUID == 0)); then DATA_DIR=/var/lib/lia-head; else DATA_DIR="$HOME/lia-head"; fi
fi
if [[ "$ACTION" == stop && ! -d "$DATA_DIR" ]]; then
    say "nothing to stop: $DATA_DIR does not exist"
    exit 0
fi
mkdir -p "$DATA_DIR"
DATA_DIR="$(cd "$DATA_DIR" && pwd -P)"
PG_DIR="$DATA_DIR/postgres"   # owned by the PostgreSQL user; also its socket folder
PG_DATA="$PG_DIR/data"
ML_DIR="$DATA_DIR/mlflow"
# the socket's path, PG_DIR/.s.PGSQL.<port>, must fit in 107 bytes
((${#PG_DIR} <= 90)) || die "--data-dir $DATA_DIR is too long a path for PostgreSQL's socket"
PID_FILE="$ML_DIR/server.pid"
[[ -n "$ARTIFACTS" ]] || ARTIFACTS="$ML_DIR/artifacts"
case "$ARTIFACTS" in  # made absolute before the cd below
    *://*) ;;
    /*) ;;
    *) ARTIFACTS="$PWD/$ARTIFACTS" ;;
esac
# a folder PostgreSQL's user may stand in; relative paths of MLflow's (basic_auth.db) land here
cd "$DATA_DIR"

# ---------------------------------------------------------------- PostgreSQL helpers
find_pg_bin() {
    if [[ -n "$PG_BIN" ]]; then
        [[ -x "$PG_BIN/pg_ctl" ]] || die "--pg-bin $PG_BIN has no pg_ctl"
        return
    fi
    local pg_ctl newest
    if pg_ctl="$(command -v pg_ctl)" && [[ -x "$(dirname "$pg_ctl")/initdb" ]]; then
        PG_BIN="$(dirname "$(readlink -f "$pg_ctl")")"
        return
    fi
    newest="$(find /usr/lib/postgresql -mindepth 3 -maxdepth 3 -path '*/bin/pg_ctl' \
        2>/dev/null | sort -V | tail -n 1)"
    [[ -n "$newest" ]] || die "PostgreSQL is not installed (no pg_ctl on PATH or in" \
        "/usr/lib/postgresql/*/bin): sudo apt-get install -y postgresql, or pass --pg-bin"
    PG_BIN="$(dirname "$newest")"
}

as_pg() {  # run a PostgreSQL program as the user who owns the database cluster
    if ((EUID == 0)); then
        runuser -u "$PG_OS_USER" -- "$@"
    else
        "$@"
    fi
}

pg_sql() {  # run the SQL read from stdin as the superuser, over the Unix socket
    as_pg "$PG_BIN/psql" -X -q -t -A -v ON_ERROR_STOP=1 -h "$PG_DIR" -p "$PG_PORT" \
        -U postgres -d postgres -f -
}

pg_running_port() {  # the port of the running server of PG_DATA, or nothing
    if [[ -f "$PG_DATA/postmaster.pid" ]] && as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" status \
        >/dev/null 2>&1; then
        sed -n 4p "$PG_DATA/postmaster.pid"
    fi
}

port_open() {  # something accepts TCP connections at host $1, port $2
    # shellcheck disable=SC2016  # $1, $2 are the inner shell's arguments
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# ---------------------------------------------------------------- MLflow helpers
mlflow_pid() {  # the pid of the running MLflow server of DATA_DIR, or nothing
    local pid
    [[ -f "$PID_FILE" ]] || return 0
    pid="$(cat "$PID_FILE")"
    if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null \
        && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q mlflow; then
        echo "$pid"
    fi
}

http_ok() {  # GET http://$1:$2$3 answers 200 (plain bash: curl may be missing)
    # shellcheck disable=SC2016  # $1, $2, $3 are the inner shell's arguments
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2" &&
        printf "GET %s HTTP/1.0\r\nHost: %s:%s\r\n\r\n" "$3" "$1" "$2" >&3 &&
        head -n 1 <&3' _ "$1" "$2" "$3" 2>/dev/null | grep -q " 200 "
}

is_wildcard() { [[ "$1" == 0.0.0.0 || "$1" == "::" || "$1" == "*" ]]; }

# ---------------------------------------------------------------- stop
if [[ "$ACTION" == stop ]]; then
    pid="$(mlflow_pid)"
    if [[ -n "$pid" ]]; then
        # the server was started as the leader of its own process group, with its workers
        if [[ "$(ps -o pgid= -p "$pid" | tr -d ' ')" == "$pid" ]]; then target="-$pid"; else
            target="$pid"
        fi
        kill -TERM -- "$target" 2>/dev/null || true
        for _ in $(seq 100); do
            kill -0 -- "$target" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL -- "$target" 2>/dev/null || true
        say "stopped the MLflow server (pid $pid)"
    else
        say "no MLflow server of $DATA_DIR is running"
    fi
    rm -f "$PID_FILE"
    if [[ -f "$PG_DATA/PG_VERSION" ]]; then
        find_pg_bin
        if [[ -n "$(pg_running_port)" ]]; then
            as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t "$TIMEOUT" stop >/dev/null
            say "stopped PostgreSQL ($PG_DATA)"
        else
            say "PostgreSQL of $DATA_DIR is not running"
        fi
    fi
    exit 0
fi

# ---------------------------------------------------------------- start: PostgreSQL
find_pg_bin
case "$HOST" in
    127.0.0.1 | localhost) HOST=127.0.0.1; PG_LISTEN=127.0.0.1 ;;
    0.0.0.0 | "::" | "*") PG_LISTEN="*" ;;
    *) PG_LISTEN="127.0.0.1,$HOST" ;;  # MLflow reaches it on 127.0.0.1
esac
if [[ -z "$ADVERTISE" ]]; then
    if is_wildcard "$HOST"; then
        ADVERTISE="$(hostname -I 2>/dev/null | awk '{print $1}')"
        [[ -n "$ADVERTISE" ]] || ADVERTISE="$(hostname)"
    else
        ADVERTISE="$HOST"
    fi
fi
LOCAL_HOST="$HOST"  # where this script checks that MLflow answers
is_wildcard "$HOST" && LOCAL_HOST=127.0.0.1

if ((EUID == 0)); then
    id -u "$PG_OS_USER" >/dev/null 2>&1 || die "running as root: PostgreSQL refuses to run" \
        "as root and the system user '$PG_OS_USER' does not exist; create it" \
        "(useradd --system $PG_OS_USER) or pass --pg-user USER"
    command -v runuser >/dev/null || die "running as root needs runuser (util-linux)"
    chmod 0711 "$DATA_DIR"  # PostgreSQL's user must traverse it, not list it
fi
mkdir -p "$PG_DIR" "$ML_DIR"
if ((EUID == 0)); then
    chown "$PG_OS_USER": "$PG_DIR"
    as_pg test -w "$PG_DIR" || die "the user '$PG_OS_USER' cannot reach $PG_DIR: give a" \
        "--data-dir whose parent folders it may traverse (e.g. /var/lib/lia-head)"
fi
chmod 0700 "$PG_DIR" "$ML_DIR"

if [[ ! -f "$PG_DATA/PG_VERSION" ]]; then
    say "creating the database cluster in $PG_DATA"
    # the superuser may connect over the socket without a password: its folder is readable
    # by the cluster's owner only; every TCP connection needs a password
    as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U postgres -E UTF8 --locale=C \
        --auth-local=trust --auth-host=scram-sha-256 >/dev/null
fi

# initdb admits TCP clients from loopback only; listening further is for other nodes, so the
# role lia may then log in from any address, with its password
HBA_LINE="host mlflow,optuna lia all scram-sha-256  # added by head_node.sh --host"
HBA_CHANGED=0
if [[ "$PG_LISTEN" != 127.0.0.1 ]] && ! as_pg grep -qxF "$HBA_LINE" "$PG_DATA/pg_hba.conf"; then
    printf '%s\n' "$HBA_LINE" | as_pg tee -a "$PG_DATA/pg_hba.conf" >/dev/null
    HBA_CHANGED=1
fi

running_port="$(pg_running_port)"
if [[ -n "$running_port" ]]; then
    [[ "$running_port" == "$PG_PORT" ]] || die "PostgreSQL of $DATA_DIR already runs on" \
        "port $running_port; pass --pg-port $running_port, or --stop it first"
    ((HBA_CHANGED == 0)) || as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" reload >/dev/null
    say "PostgreSQL already runs on port $PG_PORT"
else
    ! port_open 127.0.0.1 "$PG_PORT" || die "port $PG_PORT is taken; pass --pg-port"
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_DIR/server.log" -w -t "$TIMEOUT" \
        -o "-c listen_addresses='$PG_LISTEN' -p $PG_PORT -k '$PG_DIR'" start >/dev/null \
        || die "PostgreSQL did not start; its log says:$(echo; tail -n 20 "$PG_DIR/server.log")"
    say "PostgreSQL started on $PG_LISTEN:$PG_PORT"
fi

PASSWORD_FILE="$DATA_DIR/db_password"
if [[ ! -s "$PASSWORD_FILE" ]]; then
    (umask 077 && od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$PASSWORD_FILE")
fi
PASSWORD="$(cat "$PASSWORD_FILE")"
[[ "$PASSWORD" =~ ^[0-9a-f]+$ ]] || die "$PASSWORD_FILE must hold a hex password"

# the role and databases, created when missing; the password set each time (from stdin, so
# it appears on no command line)
pg_sql <<SQL
SELECT 'CREATE ROLE lia LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'lia')
\gexec
ALTER ROLE lia WITH LOGIN PASSWORD '$PASSWORD';
SELECT 'CREATE DATABASE mlflow OWNER lia'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow')
\gexec
SELECT 'CREATE DATABASE optuna OWNER lia'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'optuna')
\gexec
SQL

# ---------------------------------------------------------------- start: MLflow
# psycopg (3) named explicitly: SQLAlchemy before 2.1 would pick psycopg2 for postgresql://
BACKEND_URI="postgresql+psycopg://lia:$PASSWORD@127.0.0.1:$PG_PORT/mlflow"
pid="$(mlflow_pid)"
if [[ -n "$pid" ]]; then
    running="$(cat "$ML_DIR/port" 2>/dev/null || true)"
    [[ "$running" == "$PORT" ]] || die "the MLflow server of $DATA_DIR already runs on port" \
        "$running; pass --port $running, or --stop it first"
    say "the MLflow server already runs (pid $pid)"
else
    MLFLOW="$(command -v mlflow)" || die "mlflow is not on PATH: install the project" \
        "(pip install '.[cluster]') and activate its environment"
    ! port_open "$LOCAL_HOST" "$PORT" || die "port $PORT is taken; pass --port"
    case "$ARTIFACTS" in *://*) ;; *) mkdir -p "$ARTIFACTS" ;; esac
    ALLOWED=()
    # MLflow accepts Host headers of localhost and private addresses by default; a name
    # (or a public address) clients use must be added, along with the defaults kept
    if ! [[ "$ADVERTISE" =~ ^(127\.|10\.|192\.168\.|172\.(1[6-9]|2[0-9]|3[01])\.) ]]; then
        ALLOWED=(--allowed-hosts "localhost,localhost:*,127.0.0.1,127.0.0.1:*,10.*,192.168.*,\
172.1[6-9].*,172.2[0-9].*,172.3[01].*,$ADVERTISE,$ADVERTISE:*")
    fi
    # its own session and process group, so --stop ends its workers with it; MLflow's job
    # runner (GenAI scorers and trace rollups, eight more processes) is off unless asked for
    MLFLOW_BACKEND_STORE_URI="$BACKEND_URI" \
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}" \
        setsid "$MLFLOW" server \
        --host "$HOST" --port "$PORT" --workers "$WORKERS" \
        --serve-artifacts --artifacts-destination "$ARTIFACTS" \
        ${ALLOWED[@]+"${ALLOWED[@]}"} ${EXTRA[@]+"${EXTRA[@]}"} \
        </dev/null >>"$ML_DIR/server.log" 2>&1 &
    pid=$!
    echo "$pid" >"$PID_FILE"
    echo "$PORT" >"$ML_DIR/port"
    deadline=$((SECONDS + TIMEOUT))
    until http_ok "$LOCAL_HOST" "$PORT" /health; do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$PID_FILE"
            die "the MLflow server exited; $ML_DIR/server.log says:$(echo
                tail -n 20 "$ML_DIR/server.log")"
        fi
        ((SECONDS < deadline)) || die "the MLflow server did not answer within ${TIMEOUT}s" \
            "(see $ML_DIR/server.log; stop it with --stop)"
        sleep 0.5
    done
    say "MLflow server started on $HOST:$PORT (pid $pid), artifacts in $ARTIFACTS"
fi

# ---------------------------------------------------------------- what to export
EXPORTS="export MLFLOW_TRACKING_URI=http://$ADVERTISE:$PORT
export LIA_OPTUNA_STORAGE=postgresql+psycopg://lia:$PASSWORD@$ADVERTISE:$PG_PORT/optuna"
(umask 077 && echo "$EXPORTS" >"$DATA_DIR/env")
echo "$EXPORTS"
say "these lines are also in $DATA_DIR/env (source it); sweeps take the Optuna storage as"
say "  lia sweep CONFIG 'sweep.storage=\${oc.env:LIA_OPTUNA_STORAGE}'"
say "stop both servers with: $0 --stop --data-dir $DATA_DIR"
