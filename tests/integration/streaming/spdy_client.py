"""Moved to tests/support/spdy_client.py. This re-export is only for bench/stream.py,
which imports the old path; remove it once bench imports tests.support.spdy_client."""

from tests.support.spdy_client import spdy_exec

__all__ = ["spdy_exec"]
