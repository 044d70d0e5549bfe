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

# A throwaway redis-server on 127.0.0.1 and a free port, its files in a temporary
# directory, stopped and removed when the calling shell exits: `start_redis_server VAR
# ARGS...` exports VAR as its URL once it answers; ARGS go to redis-server (persistence).
if ! declare -F start_redis_server >/dev/null; then
_redis_dirs=()
_stop_redis_servers() {
  local dir
  for dir in "${_redis_dirs[@]}"; do
    stop_pids "$dir/redis.pid"
    rm -rf "$dir" || true
  done
}
start_redis_server() {
  local var="$1" dir port
  shift
  dir="$(mktemp -d /tmp/tower-coalesce-redis.XXXXXX)"
  port="$(free_port)"
  [ ${#_redis_dirs[@]} -eq 0 ] && on_exit _stop_redis_servers
  _redis_dirs+=("$dir")
  redis-server --bind 127.0.0.1 --port "$port" --dir "$dir" --pidfile "$dir/redis.pid" \
    --logfile "$dir/redis.log" --daemonize yes "$@"
  for _ in $(seq 1 100); do
    redis-cli -p "$port" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
  redis-cli -p "$port" ping >/dev/null || { cat "$dir/redis.log"; exit 1; }
  export "$var=redis://127.0.0.1:$port"
  echo "$(redis-server --version | awk '{print $1, $2, $3}') on 127.0.0.1:$port"
}
fi

start_redis_server REDIS_URL --save '' --appendonly no
