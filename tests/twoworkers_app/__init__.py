"""A tiny Django + Channels project served by ``uvicorn --workers 2`` in test_two_workers.py."""
