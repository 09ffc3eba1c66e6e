# What the bench scripts share; sourced by them, not run. Each script sets server_pid when it
# starts a server, and stops it with stop_server (also on exit).

server_pid=
stop_server() {
  if [[ -n $server_pid ]]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=
  fi
}
trap stop_server EXIT

# Waits for a line matching $2 in the file $1, for up to $3 seconds (10 by default); prints it.
wait_for_line() {
  local tries=$((${3:-10} * 20))
  for _ in $(seq "$tries"); do
    if grep -m1 -E "$2" "$1" 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "no line matching '$2' in $1:" >&2
  cat "$1" >&2
  return 1
}

# Waits for the command a fresh gateway prints on its first start, in its stdout $1 (for up
# to $2 seconds), and sets url and token from it.
read_first_start() {
  local command
  command=$(wait_for_line "$1" ' send --url ' "${2:-10}") || return 1
  url=$(grep -oE 'ws://[^ ]+' <<<"$command")
  token=$(grep -oE 'iat_[^ ]+' <<<"$command")
}
