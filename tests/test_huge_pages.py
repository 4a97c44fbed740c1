"""``import sdlit`` puts PyTorch's large CPU tensors on transparent huge pages (sdlit/__init__.py), unless opted out.

Each case runs in a fresh interpreter: PyTorch reads ``THP_MEM_ALLOC_ENABLE`` once, at its first allocation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")

PROBE = """
import json, os
import sdlit, torch
big = torch.ones(64 * 2**20 // 4)  # 64 MiB
huge = [int(l.split()[1]) for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages:")][0]
print(json.dumps({"env": os.environ.get("THP_MEM_ALLOC_ENABLE"), "huge_kib": huge}))
"""


def probe(**env: str) -> dict:
    environment = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | env
    out = subprocess.run([sys.executable, "-c", PROBE], env=environment, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode (``always``, ``madvise``, ``never``), None where there is none."""
    if not THP_MODE.exists():
        return None
    return THP_MODE.read_text().split("[", 1)[1].split("]", 1)[0]


needs_linux_thp = pytest.mark.skipif(not sys.platform.startswith("linux") or thp_mode() in (None, "never"),
                                     reason="needs Linux with transparent huge pages")


@needs_linux_thp
def test_importing_sdlit_puts_large_tensors_on_huge_pages():
    result = probe()
    assert result["env"] == "1"
    assert result["huge_kib"] >= 2048  # at least one 2 MiB page of the 64 MiB tensor


@pytest.mark.skipif(thp_mode() != "madvise", reason="with THP 'always' every process gets huge pages")
def test_users_opt_out_is_kept():
    result = probe(THP_MEM_ALLOC_ENABLE="0")
    assert result["env"] == "0"
    assert result["huge_kib"] == 0
