"""Helpers of the operator suites: run `criv` subcommands, scrape the metrics endpoint."""

from __future__ import annotations

import socket
import subprocess
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.support.cri import Cri
from tests.support.daemon import CRIV


def criv_cli(cri: Cri, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [str(CRIV), args[0], "--config", str(cri.proc.config_path), *args[1:]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check:
        assert r.returncode == 0, f"criv {' '.join(args)}: {r.returncode}\n{r.stdout}{r.stderr}"
    return r


def table_row(out: str, first: str) -> list[str]:
    """The table line whose first cell starts with ``first``, split on spaces."""
    rows = [line.split() for line in out.splitlines()[1:] if line.startswith(first)]
    assert len(rows) == 1, f"no single row for {first} in:\n{out}"
    return rows[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


Samples = dict[str, dict[frozenset[tuple[str, str]], float]]


def scrape(port: int) -> tuple[set[str], Samples]:
    """The endpoint's family names (counters without ``_total``) and its samples:
    name -> {labels: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    families: set[str] = set()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        families.add(fam.name)
        for s in fam.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return families, out


def sample(samples: Samples, name: str, **labels: str) -> float:
    """The value of one series (0 when it is absent)."""
    return samples.get(name, {}).get(frozenset(labels.items()), 0.0)
