# shellcheck shell=bash
# Start a throwaway Redis server for the Redis driver's tests, and stop it when the shell exits.
#
# Source it (``. .ci/start-redis.sh``) from a bash script such as .ci/run: it exports
#   CHANNELS_LITE_TEST_REDIS_URL=redis://127.0.0.1:<port>/0
# and chains an EXIT trap that stops the server and removes its directory. It never calls
# `exit` (that would end the sourcing shell): on failure it prints why and returns non-zero,
# leaving the URL unset, so that the Redis tests fail loudly in CI (they never skip there).
#
# The server listens on 127.0.0.1 only, on a free port, keeps nothing on disk
# (--save '' --appendonly no) and runs from a fresh temporary directory. redis-server is
# installed from the Debian packages if it is missing. CHANNELS_LITE_REDIS_SERVER overrides
# the binary.

_cl_redis_start() {
    local server="${CHANNELS_LITE_REDIS_SERVER:-redis-server}"
    if ! command -v "$server" >/dev/null 2>&1; then
        echo "start-redis: installing redis-server from Debian packages" >&2
        local sudo=()
        [ "$(id -u)" -ne 0 ] && sudo=(sudo)
        if ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
            || ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -qq --no-install-recommends redis-server >/dev/null; then
            echo "start-redis: apt-get could not install redis-server" >&2
            return 1
        fi
    fi

    local dir
    dir="$(mktemp -d "${TMPDIR:-/tmp}/channels-lite-redis.XXXXXX")" || return 1

    # A free port: ask the kernel for one, then hand it to the server at once; retry a few
    # times in the unlikely case another process grabs it in between.
    local port attempt started=0
    for attempt in 1 2 3 4 5; do
        port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null \
            || echo $((20000 + RANDOM % 20000)))"
        "$server" --bind 127.0.0.1 --port "$port" --save '' --appendonly no \
            --dir "$dir" --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" \
            >/dev/null 2>&1 || true
        local waited
        for waited in $(seq 1 50); do
            if python3 - "$port" <<'PY' 2>/dev/null; then
import socket, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1) as s:
    s.sendall(b"PING\r\n")
    sys.exit(0 if s.recv(64).startswith(b"+PONG") else 1)
PY
                started=1
                break
            fi
            sleep 0.1
        done
        [ "$started" -eq 1 ] && break
        echo "start-redis: could not start on port $port (attempt $attempt)" >&2
        if [ -s "$dir/redis.pid" ]; then kill "$(cat "$dir/redis.pid")" 2>/dev/null || true; fi
    done
    if [ "$started" -ne 1 ]; then
        echo "start-redis: the server did not start; its log:" >&2
        tail -n 30 "$dir/redis.log" >&2 2>/dev/null
        rm -rf "$dir"
        return 1
    fi

    export CHANNELS_LITE_TEST_REDIS_URL="redis://127.0.0.1:${port}/0"
    _CL_REDIS_DIR="$dir"
    echo "start-redis: $("$server" --version | awk '{print $3}') on 127.0.0.1:$port (in $dir)" >&2
    return 0
}

_cl_redis_stop() {
    # Runs from an EXIT trap, possibly under `set -e`: no command here may fail.
    if [ -n "${_CL_REDIS_DIR:-}" ] && [ -d "$_CL_REDIS_DIR" ]; then
        local pid="" waited
        [ -s "$_CL_REDIS_DIR/redis.pid" ] && pid="$(cat "$_CL_REDIS_DIR/redis.pid" 2>/dev/null || true)"
        if [ -n "$pid" ]; then
            kill "$pid" 2>/dev/null || true
            for waited in $(seq 1 50); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -rf "$_CL_REDIS_DIR" || true
    fi
    _CL_REDIS_DIR=""
}

_cl_redis_chain_trap() {
    # `trap -p` prints `trap -- 'command' EXIT`, quoted for eval: let the shell unquote it
    # (inside a function, so the sourcing script's positional parameters stay untouched).
    local previous
    previous="$(trap -p EXIT)"
    if [ -n "$previous" ]; then
        eval "set -- $previous"
        # shellcheck disable=SC2064  # expand the previous trap now, on purpose
        trap "_cl_redis_stop; $3" EXIT
    else
        trap _cl_redis_stop EXIT
    fi
}

if _cl_redis_start; then
    _cl_redis_chain_trap
else
    echo "start-redis: Redis is NOT running; CHANNELS_LITE_TEST_REDIS_URL is unset" >&2
    false
fi
