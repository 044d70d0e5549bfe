# Sourced by .ci/run: installs redis-server from Debian's packages if it is missing, starts
# a throwaway server on 127.0.0.1 and a free port, exports REDIS_URL, and stops it when the
# calling shell exits. The Redis tests also start servers of their own (to stop and restart
# them), so they need the binary on PATH.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if ! command -v redis-server >/dev/null 2>&1; then
  echo "installing redis-server"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq redis-server >/dev/null
fi

REDIS_DIR="$(mktemp -d /tmp/tower-coalesce-redis.XXXXXX)"
REDIS_PORT="$(free_port)"
stop_redis() {
  stop_pids "$REDIS_DIR/redis.pid"
  rm -rf "$REDIS_DIR" || true
}
on_exit stop_redis

redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no \
  --dir "$REDIS_DIR" --pidfile "$REDIS_DIR/redis.pid" --logfile "$REDIS_DIR/redis.log" \
  --daemonize yes
for _ in $(seq 1 100); do
  redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
  sleep 0.1
done
redis-cli -p "$REDIS_PORT" ping >/dev/null || { cat "$REDIS_DIR/redis.log"; exit 1; }

export REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
echo "$(redis-server --version | awk '{print $1, $2, $3}') on 127.0.0.1:$REDIS_PORT"
