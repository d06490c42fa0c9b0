"""The numba cache of a kernel module is dropped when a file it compiles in is newer."""

from __future__ import annotations

import os

from features.common import drop_stale_numba_cache


def test_cache_older_than_a_dependency_is_deleted_and_a_newer_one_kept(tmp_path):
    mod = tmp_path / "kern.py"
    dep = tmp_path / "helpers.py"
    cache = tmp_path / "__pycache__"
    cache.mkdir()
    mod.write_text("")
    dep.write_text("")
    index, data = cache / "kern.apply-12.py312.nbi", cache / "kern.apply-12.py312.1.nbc"
    other = cache / "other.apply-3.py312.nbi"  # another module's cache: never touched
    for f in (index, data, other):
        f.write_bytes(b"x")
    os.utime(dep, (2_000, 2_000))
    for f in (index, data, other):
        os.utime(f, (3_000, 3_000))  # written after the dependency changed: kept
    drop_stale_numba_cache(str(mod), [str(tmp_path / "h*.py")])
    assert index.exists() and data.exists()
    os.utime(dep, (4_000, 4_000))  # the dependency changed after the cache was written
    drop_stale_numba_cache(str(mod), [str(tmp_path / "h*.py")])
    assert not index.exists() and not data.exists() and other.exists()
    drop_stale_numba_cache(str(mod), [str(tmp_path / "missing.py")])  # nothing to compare: no error
