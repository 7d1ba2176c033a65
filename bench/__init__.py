"""Benchmark harness for channels-lite against InMemory and channels_redis (see README.md)."""
