# shellcheck shell=bash
# Start a throwaway PostgreSQL 15 server for the test suite, and stop it when the shell exits.
#
# Source it (``. .ci/start-postgres.sh``) from a bash script such as .ci/run: it exports
#   CHANNELS_LITE_TEST_POSTGRES_DSN=postgresql://cltest:<random>@127.0.0.1:<port>/channels_lite
# and CHANNELS_LITE_TEST_POSTGRES_{BIN,DATA,LOG,OWNER} (so tests can restart it), and chains an EXIT trap that stops the server and removes its
# data directory. It never calls `exit` (that would end the sourcing shell): on failure it
# prints why and returns non-zero, leaving the DSN unset, so that the PostgreSQL tests fail
# loudly in CI (they never skip there).
#
# What it does:
# - installs PostgreSQL 15 from the Debian packages if its binaries are missing;
# - runs initdb into a fresh temporary directory as a non-root user (the current user if not
#   root; otherwise `postgres` if it exists, else a `cltest` user created on the spot);
# - listens on 127.0.0.1 only, on a free port, with its unix socket in the data directory;
# - creates the database and a password-protected role (so that tests can check that
#   passwords never appear in error messages).
#
# Tunables (environment): CHANNELS_LITE_PG_BIN (binaries directory, default
# /usr/lib/postgresql/15/bin), CHANNELS_LITE_PG_OPTIONS (extra `-c name=value` server options;
# the default turns fsync off: this server holds test data only), CHANNELS_LITE_PG_OWNER (the
# user that owns the cluster when running as root; default postgres, else cltest).

_cl_pg_start() {
    local bin="${CHANNELS_LITE_PG_BIN:-/usr/lib/postgresql/15/bin}"
    local extra="${CHANNELS_LITE_PG_OPTIONS:--c fsync=off -c full_page_writes=off}"
    local runner=() owner

    if [ ! -x "$bin/initdb" ] || [ ! -x "$bin/pg_ctl" ]; then
        echo "start-postgres: installing PostgreSQL 15 from Debian packages" >&2
        local sudo=()
        [ "$(id -u)" -ne 0 ] && sudo=(sudo)
        if ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
            || ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -qq --no-install-recommends postgresql-15 postgresql-client-15 \
                >/dev/null; then
            echo "start-postgres: apt-get could not install postgresql-15" >&2
            return 1
        fi
        if [ ! -x "$bin/initdb" ]; then
            echo "start-postgres: no initdb in $bin after installing; set CHANNELS_LITE_PG_BIN" >&2
            return 1
        fi
    fi

    # PostgreSQL refuses to run as root: pick (or make) an ordinary user to own the cluster.
    if [ "$(id -u)" -eq 0 ]; then
        if [ -n "${CHANNELS_LITE_PG_OWNER:-}" ]; then
            owner="$CHANNELS_LITE_PG_OWNER"
        elif id postgres >/dev/null 2>&1; then
            owner=postgres
        else
            owner=cltest
        fi
        if ! id "$owner" >/dev/null 2>&1 \
            && ! useradd --system --no-create-home --shell /usr/sbin/nologin "$owner"; then
            echo "start-postgres: cannot create the '$owner' user" >&2
            return 1
        fi
        runner=(runuser -u "$owner" --)
    else
        owner="$(id -un)"
    fi

    local dir
    dir="$(mktemp -d "${TMPDIR:-/tmp}/channels-lite-pg.XXXXXX")" || return 1
    chmod 0700 "$dir"
    [ "$(id -u)" -eq 0 ] && chown "$owner" "$dir"

    local password
    password="$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
    printf '%s\n' "$password" >"$dir/pwfile"
    chmod 0600 "$dir/pwfile"
    [ "$(id -u)" -eq 0 ] && chown "$owner" "$dir/pwfile"

    if ! "${runner[@]}" "$bin/initdb" -D "$dir/data" -U cltest --pwfile="$dir/pwfile" \
        --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 \
        >"$dir/initdb.log" 2>&1; then
        echo "start-postgres: initdb failed:" >&2
        cat "$dir/initdb.log" >&2
        rm -rf "$dir"
        return 1
    fi
    rm -f "$dir/pwfile"

    # A free port: ask the kernel for one, then hand it to the server at once. Retry a few
    # times in the unlikely case another process grabs it in between.
    local port attempt started=0
    for attempt in 1 2 3 4 5; do
        port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null \
            || echo $((20000 + RANDOM % 20000)))"
        # shellcheck disable=SC2086  # $extra is a list of server options on purpose
        if "${runner[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
            -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=400 $extra" \
            start >/dev/null; then
            started=1
            break
        fi
        echo "start-postgres: could not start on port $port (attempt $attempt)" >&2
    done
    if [ "$started" -ne 1 ]; then
        echo "start-postgres: the server did not start; its log:" >&2
        tail -n 30 "$dir/server.log" >&2
        rm -rf "$dir"
        return 1
    fi

    if ! "${runner[@]}" "$bin/psql" -h "$dir" -p "$port" -U cltest -d postgres -qAt \
        -c "CREATE DATABASE channels_lite" >/dev/null; then
        echo "start-postgres: could not create the database" >&2
        "${runner[@]}" "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1
        rm -rf "$dir"
        return 1
    fi

    # The server's own files, for tests that restart it (tests/drivers/test_postgres.py).
    export CHANNELS_LITE_TEST_POSTGRES_BIN="$bin"
    export CHANNELS_LITE_TEST_POSTGRES_DATA="$dir/data"
    export CHANNELS_LITE_TEST_POSTGRES_LOG="$dir/server.log"
    export CHANNELS_LITE_TEST_POSTGRES_OWNER="$owner"
    export CHANNELS_LITE_TEST_POSTGRES_DSN="postgresql://cltest:${password}@127.0.0.1:${port}/channels_lite"
    _CL_PG_DIR="$dir"
    _CL_PG_RUNNER=("${runner[@]}")
    echo "start-postgres: PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port (data in $dir)" >&2
    return 0
}

_cl_pg_stop() {
    if [ -n "${_CL_PG_DIR:-}" ] && [ -d "$_CL_PG_DIR/data" ]; then
        local bin="$CHANNELS_LITE_TEST_POSTGRES_BIN"
        "${_CL_PG_RUNNER[@]}" "$bin/pg_ctl" -D "$_CL_PG_DIR/data" -m fast -w -t 30 stop \
            >/dev/null 2>&1 \
            || "${_CL_PG_RUNNER[@]}" "$bin/pg_ctl" -D "$_CL_PG_DIR/data" -m immediate stop \
                >/dev/null 2>&1
        rm -rf "$_CL_PG_DIR"
    fi
    _CL_PG_DIR=""
}

_cl_pg_chain_trap() {
    # `trap -p` prints `trap -- 'command' EXIT`, quoted for eval: let the shell unquote it
    # (inside a function, so the sourcing script's positional parameters stay untouched).
    local previous
    previous="$(trap -p EXIT)"
    if [ -n "$previous" ]; then
        eval "set -- $previous"
        # shellcheck disable=SC2064  # expand the previous trap now, on purpose
        trap "_cl_pg_stop; $3" EXIT
    else
        trap _cl_pg_stop EXIT
    fi
}

if _cl_pg_start; then
    _cl_pg_chain_trap
else
    echo "start-postgres: PostgreSQL is NOT running; CHANNELS_LITE_TEST_POSTGRES_DSN is unset" >&2
    false
fi
