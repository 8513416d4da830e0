#!/usr/bin/env bash
# Start a throwaway PostgreSQL cluster (trust auth, 127.0.0.1 only) for the postgres-marked tests.
# Usage: .ci/start-postgres.sh [DATA_DIR=/tmp/cicd-pg] [PORT=55432]; safe to re-run.
# Then: CICD_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:$PORT/postgres
set -euo pipefail
data_dir=${1:-/tmp/cicd-pg}
port=${2:-55432}
pg_bin=${PG_BIN:-/usr/lib/postgresql/15/bin}

# initdb and postgres refuse to run as root, so root hands the cluster to a `postgres` user.
if [ "$(id -u)" = 0 ]; then
    id -u postgres >/dev/null 2>&1 || useradd --system --user-group --no-create-home postgres
    mkdir -p "$data_dir"
    chown postgres: "$data_dir"
    as_owner() { runuser -u postgres -- "$@"; }
else
    mkdir -p "$data_dir"
    as_owner() { "$@"; }
fi

if [ ! -f "$data_dir/PG_VERSION" ]; then
    as_owner "$pg_bin/initdb" -D "$data_dir" -U postgres --auth=trust >/dev/null
fi
if ! as_owner "$pg_bin/pg_ctl" -D "$data_dir" status >/dev/null; then
    as_owner "$pg_bin/pg_ctl" -D "$data_dir" -l "$data_dir/server.log" \
        -o "-p $port -k /tmp -c listen_addresses=127.0.0.1" start >/dev/null
fi
for _ in $(seq 60); do
    "$pg_bin/pg_isready" -q -h 127.0.0.1 -p "$port" && exit 0
    sleep 0.5
done
echo "PostgreSQL on port $port is not ready; see $data_dir/server.log" >&2
exit 1
