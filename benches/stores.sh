#!/usr/bin/env bash
# Runs `benches/stores.rs` against real servers, started here on 127.0.0.1 and stopped at
# the end: PostgreSQL with `fsync` on (as users run it), a Redis that keeps nothing on disk
# (`--save '' --appendonly no`), beside it a durable Redis (`--appendonly yes
# --appendfsync always`: every write is on disk before it is answered), the reference for
# keeping idempotency keys, and a Redis Cluster of three masters (keeping nothing on disk),
# so that every store is in the same run. Installs PostgreSQL and Redis if they are
# missing. Arguments go to the bench (a criterion filter, say).
#
#     bash benches/stores.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PG_FSYNC=${PG_FSYNC:-on} source .ci/postgres.sh
source .ci/redis.sh
source .ci/redis-cluster.sh

start_redis_server REDIS_DURABLE_URL --save '' --appendonly yes --appendfsync always

cargo bench --manifest-path benches/Cargo.toml --bench stores -- "$@"
