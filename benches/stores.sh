#!/usr/bin/env bash
# Runs `benches/stores.rs` against real servers, started here on 127.0.0.1 and stopped at
# the end: PostgreSQL with `fsync` on (as users run it), a Redis that keeps nothing on disk
# (`--save '' --appendonly no`), and beside it a durable Redis (`--appendonly yes
# --appendfsync always`: every write is on disk before it is answered), the reference for
# keeping idempotency keys. Installs PostgreSQL and Redis if they are missing. Arguments go
# to the bench (a criterion filter, say).
#
#     bash benches/stores.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PG_FSYNC=${PG_FSYNC:-on} source .ci/postgres.sh
source .ci/redis.sh

DURABLE_DIR="$(mktemp -d /tmp/tower-coalesce-redis-aof.XXXXXX)"
DURABLE_PORT="$(free_port)"
stop_durable() {
  stop_pids "$DURABLE_DIR/redis.pid"
  rm -rf "$DURABLE_DIR" || true
}
on_exit stop_durable
redis-server --bind 127.0.0.1 --port "$DURABLE_PORT" --save '' --appendonly yes \
  --appendfsync always --dir "$DURABLE_DIR" --pidfile "$DURABLE_DIR/redis.pid" \
  --logfile "$DURABLE_DIR/redis.log" --daemonize yes
for _ in $(seq 1 100); do
  redis-cli -p "$DURABLE_PORT" ping >/dev/null 2>&1 && break
  sleep 0.1
done
export REDIS_DURABLE_URL="redis://127.0.0.1:$DURABLE_PORT"

cargo bench --manifest-path benches/Cargo.toml --bench stores -- "$@"
