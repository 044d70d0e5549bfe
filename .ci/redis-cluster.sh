# Sourced by .ci/run after .ci/redis.sh (which installs redis-server and redis-cli): starts a
# throwaway Redis Cluster of three masters and no replicas on 127.0.0.1 and free ports,
# exports REDIS_CLUSTER_URLS (comma-separated), and stops it when the calling shell exits.
# The test that kills a master mid-flight starts a cluster of its own instead.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CLUSTER_DIR="$(mktemp -d /tmp/tower-coalesce-cluster.XXXXXX)"
stop_redis_cluster() {
  stop_pids "$CLUSTER_DIR"/*/redis.pid
  rm -rf "$CLUSTER_DIR" || true
}
on_exit stop_redis_cluster

CLUSTER_NODES=()
for _ in 1 2 3; do
  port="$(free_cluster_port)"
  mkdir "$CLUSTER_DIR/$port"
  redis-server --bind 127.0.0.1 --port "$port" --cluster-enabled yes \
    --cluster-config-file "$CLUSTER_DIR/$port/nodes.conf" --save '' --appendonly no \
    --dir "$CLUSTER_DIR/$port" --pidfile "$CLUSTER_DIR/$port/redis.pid" \
    --logfile "$CLUSTER_DIR/$port/redis.log" --daemonize yes
  CLUSTER_NODES+=("127.0.0.1:$port")
done
for node in "${CLUSTER_NODES[@]}"; do
  for _ in $(seq 1 100); do
    redis-cli -p "${node#*:}" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
done
redis-cli --cluster create "${CLUSTER_NODES[@]}" --cluster-replicas 0 --cluster-yes >"$CLUSTER_DIR/create.log" 2>&1 \
  || { cat "$CLUSTER_DIR/create.log" "$CLUSTER_DIR"/*/redis.log; exit 1; }
# Every node must see all slots served before the tests start.
for node in "${CLUSTER_NODES[@]}"; do
  for _ in $(seq 1 100); do
    redis-cli -p "${node#*:}" cluster info | grep -q 'cluster_state:ok' && break
    sleep 0.1
  done
  redis-cli -p "${node#*:}" cluster info | grep -q 'cluster_state:ok' \
    || { echo "the cluster did not come up on $node"; cat "$CLUSTER_DIR"/*/redis.log; exit 1; }
done

REDIS_CLUSTER_URLS="$(printf 'redis://%s,' "${CLUSTER_NODES[@]}")"
export REDIS_CLUSTER_URLS="${REDIS_CLUSTER_URLS%,}"
echo "Redis Cluster of three masters on ${CLUSTER_NODES[*]}"
