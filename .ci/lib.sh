# Sourced by the .ci scripts: `on_exit CMD` runs CMD when the calling shell exits, after
# the commands registered before it (a second `trap ... EXIT` would replace the first).
if ! declare -F on_exit >/dev/null; then
  _on_exit_cmds=()
  _run_on_exit() { local c; for c in "${_on_exit_cmds[@]}"; do "$c"; done; }
  on_exit() { _on_exit_cmds+=("$1"); trap _run_on_exit EXIT; }
fi

# A free TCP port on 127.0.0.1.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
