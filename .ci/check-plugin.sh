#!/usr/bin/env bash
# Install the example third-party driver (examples/redis-driver) into the project environment,
# check that channels-lite discovers it through its entry point, and run the conformance suite
# against it through the `channels-lite conformance` command, as a driver author would.
#
# Needs a Redis server: run after `. .ci/start-redis.sh` (which exports
# CHANNELS_LITE_TEST_REDIS_URL). Extra arguments go to pytest, e.g. `.ci/check-plugin.sh -x`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

: "${CHANNELS_LITE_TEST_REDIS_URL:?no Redis server: source .ci/start-redis.sh first}"

echo "== install examples/redis-driver"
# The environment `uv run` uses (UV_PROJECT_ENVIRONMENT, else .venv); `uv run` keeps packages
# installed this way (it only adds what the lock file lists).
uv sync --inexact --quiet
uv pip install --python "${UV_PROJECT_ENVIRONMENT:-.venv}" -e examples/redis-driver

echo "== mypy --strict examples/redis-driver"
uv run mypy --strict examples/redis-driver/src

echo "== channels-lite drivers"
uv run channels-lite drivers
uv run channels-lite drivers --json | uv run python -c '
import json, sys
drivers = {row["name"]: row for row in json.load(sys.stdin)}
if "redis" not in drivers:
    sys.exit(f"check-plugin: channels-lite drivers does not list redis (found: {sorted(drivers)})")
row = drivers["redis"]
if row["plugin"] != "redis" or not row["version"]:
    sys.exit(f"check-plugin: redis is not registered from its entry point: {row}")
version, plugin = row["version"], row["plugin"]
print(f"check-plugin: redis driver {version} found through plugin {plugin!r}")
'

echo "== channels-lite conformance --driver redis"
uv run channels-lite conformance --driver redis --option "url=${CHANNELS_LITE_TEST_REDIS_URL}" \
    -- -q "$@"
