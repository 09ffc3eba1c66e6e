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

# Core $1's CPU time stolen by the host (a virtual machine's neighbours) and its CPU time in
# all, in clock ticks since boot: "steal total". Runs during which the host took a share of
# the time are slower whatever is measured, so the scripts report that share, for the
# server's core and the load generator's apart.
cpu_ticks() {
  awk -v cpu="cpu$1" '$1 == cpu { total = 0; for (i = 2; i <= NF; i++) total += $i; print $9, total }' /proc/stat
}

# The percentage of CPU time stolen between two `cpu_ticks` readings, $1 and $2.
steal_percent() {
  awk -v a="$1" -v b="$2" 'BEGIN { split(a, x, " "); split(b, y, " ")
    total = y[2] - x[2]; printf "%.1f", (total > 0 ? 100 * (y[1] - x[1]) / total : 0) }'
}

# Builds the gateway and the reference echo server (release); sets IAGENT, unless it is set
# already, and REFERENCE to their binaries.
build_servers() {
  echo "building (release)..." >&2
  cargo build --release --quiet -p iagent
  cargo build --release --quiet --manifest-path bench/reference-echo/Cargo.toml
  local target reference_target
  target=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
  reference_target=$(cargo metadata --format-version 1 --no-deps \
    --manifest-path bench/reference-echo/Cargo.toml | jq -r .target_directory)
  IAGENT=${IAGENT:-"$target/release/iagent"}
  REFERENCE="$reference_target/release/reference-echo"
}

# Starts gateway binary $1 on core $SERVER_CORE with its configuration, data and output in
# directory $2, which holds `iagent.toml` already; sets server_pid, url and token.
start_gateway_in() {
  local build=$1 dir=$2
  IAGENT_LOG=warn taskset -c "$SERVER_CORE" "$build" serve --config "$dir/iagent.toml" \
    --data "$dir/data" --listen 127.0.0.1:0 >"$dir/stdout" 2>"$dir/stderr" &
  server_pid=$!
  read_first_start "$dir/stdout" || { cat "$dir/stderr" >&2; exit 1; }
}

# Starts the reference echo server ($REFERENCE) on core $SERVER_CORE, its output in file $1;
# sets server_pid and url, and clears token (the reference takes none).
start_reference_in() {
  taskset -c "$SERVER_CORE" "$REFERENCE" 127.0.0.1:0 >"$1" 2>&1 &
  server_pid=$!
  url=$(wait_for_line "$1" '^listening on ' | grep -oE 'ws://[^ ]+')
  token=
}
