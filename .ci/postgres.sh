# Sourced by .ci/run: installs PostgreSQL from Debian's packages if it is missing, starts a
# throwaway cluster in a temporary directory on 127.0.0.1 and a free port, exports
# DATABASE_URL, and stops the cluster (and removes it) when the calling shell exits.
# The server runs as the `postgres` user, because initdb refuses to run as root. Without
# `fsync` (tests), unless PG_FSYNC=on (the benchmarks of the stores).

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

pg_bin() {
  ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1 | xargs -r dirname
}

if [ -z "$(pg_bin)" ]; then
  echo "installing postgresql"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq postgresql >/dev/null
fi
PG_BIN="$(pg_bin)"
if [ -z "$PG_BIN" ]; then
  echo "postgresql is not installed and could not be installed" >&2
  exit 1
fi

as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

PG_DIR="$(mktemp -d /tmp/tower-coalesce-pg.XXXXXX)"
[ "$(id -u)" = 0 ] && chown postgres:postgres "$PG_DIR"
PG_PORT="$(free_port)"

stop_postgres() {
  as_postgres "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$PG_DIR" || true
}
on_exit stop_postgres

as_postgres "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres -A trust >"$PG_DIR/initdb.log" 2>&1 \
  || { cat "$PG_DIR/initdb.log"; exit 1; }
as_postgres "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w \
  -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_DIR -c max_connections=200 -c fsync=${PG_FSYNC:-off}" start >/dev/null \
  || { cat "$PG_DIR/server.log"; exit 1; }

export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
echo "PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PG_PORT"
