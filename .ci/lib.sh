# Sourced by the .ci scripts: `on_exit CMD` runs CMD when the calling shell exits, after
# the commands registered before it (a second `trap ... EXIT` would replace the first).
if ! declare -F on_exit >/dev/null; then
  _on_exit_cmds=()
  # A clean-up that fails is reported but does not fail the run it ends.
  _run_on_exit() { local c; for c in "${_on_exit_cmds[@]}"; do "$c" || echo "clean-up $c failed" >&2; done; }
  on_exit() { _on_exit_cmds+=("$1"); trap _run_on_exit EXIT; }
fi

# Stops the processes whose pid files are given and waits (up to 10 s) until they are gone,
# so that removing their directories does not race with their last writes (a Redis Cluster
# node rewrites nodes.conf as it shuts down).
stop_pids() {
  local pid_file pids=() i
  for pid_file in "$@"; do
    [ -f "$pid_file" ] && pids+=("$(cat "$pid_file")")
  done
  [ ${#pids[@]} -eq 0 ] && return 0
  kill "${pids[@]}" 2>/dev/null || true
  for i in $(seq 100); do
    kill -0 "${pids[@]}" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -9 "${pids[@]}" 2>/dev/null || true
}

# A free TCP port on 127.0.0.1.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# A free port for a Redis Cluster node: its cluster bus listens 10000 above it, so that
# port must be free too (and the node's port at most 55535).
free_cluster_port() {
  python3 -c '
import random, socket
def free(p):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); return True
    except OSError:
        return False
    finally:
        s.close()
while True:
    p = random.randint(20000, 55535)
    if free(p) and free(p + 10000):
        print(p); break'
}
