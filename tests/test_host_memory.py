"""gslim.host_memory: with GSLIM_HOST_MEMORY=keep the CLI keeps large freed blocks in the process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gslim.errors import GslimError
from gslim.host_memory import apply_from_environment, keep_freed_memory

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc (Linux) only")

# In a fresh process: start the CLI (its root callback reads GSLIM_HOST_MEMORY), then fill and
# free a 128 MB tensor ten times, as a forward pass does with its activations; the minor page
# faults of the last nine, in units of the tensor's pages (32,768 of 4 KiB).
_PROBE = """
import json, resource, torch
from gslim.cli import _root
from gslim.host_memory import apply_from_environment
_root(debug=False, version=None)
status = apply_from_environment()
torch.empty(32 * 2**20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(9):
    t = torch.empty(32 * 2**20).fill_(2.0)
    del t
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"status": status, "tensors": faults / 32768}))
"""


def _probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "GSLIM_HOST_MEMORY")}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env={**clean, **env}, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _thp_always() -> bool:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.exists() and "[always]" in path.read_text()


@glibc_only
def test_keep_makes_the_cli_reuse_freed_large_blocks():
    kept = _probe(GSLIM_HOST_MEMORY="keep")
    assert kept["status"] == "kept"
    # the heap may grow by a block or two before it reuses them (alignment padding fragments
    # it); glibc's default maps, faults in and zeroes all nine
    assert kept["tensors"] < 3.0, kept


@glibc_only
@pytest.mark.skipif(_thp_always(), reason="transparent huge pages 'always': a fresh block faults per 2 MB")
def test_without_the_setting_glibc_faults_every_block_in_again():
    default = _probe()
    assert default["status"] == "glibc default"
    assert default["tensors"] > 8.0, default


def test_malloc_tunables_set_by_the_user_win(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1048576")
    assert keep_freed_memory() == "GLIBC_TUNABLES sets malloc"


def test_an_unknown_setting_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("GSLIM_HOST_MEMORY", "fast")
    with pytest.raises(GslimError, match="GSLIM_HOST_MEMORY='fast': expected 'keep'"):
        apply_from_environment()


def test_the_cli_reports_an_unknown_setting_as_one_line():
    env = {**os.environ, "GSLIM_HOST_MEMORY": "fast"}
    proc = subprocess.run(
        [sys.executable, "-m", "gslim", "compress", "--help"], env=env, capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "gslim: error: GSLIM_HOST_MEMORY='fast': expected 'keep' (or 'default', or unset)"
    ]


@glibc_only
def test_a_selection_mostly_in_the_kernel_gets_a_hint_unless_kept(monkeypatch):
    import gslim.host_memory as hm

    monkeypatch.setattr(hm, "_kept", False)
    hint = hm.kernel_time_hint(5.4, 8.1, "selection")
    assert hint is not None and "60% of the selection's CPU time" in hint and "GSLIM_HOST_MEMORY=keep" in hint
    assert hm.kernel_time_hint(15.2, 0.2, "selection") is None  # user time: nothing to suggest
    monkeypatch.setattr(hm, "_kept", True)
    assert hm.kernel_time_hint(5.4, 8.1, "selection") is None  # already applied
    monkeypatch.setattr(hm, "_kept", False)
    monkeypatch.setattr(hm, "_glibc", lambda: None)
    assert hm.kernel_time_hint(5.4, 8.1, "selection") is None  # not glibc: the setting does nothing
