"""bench/common.py: the commit a benchmark reports, from a checkout and from an unpacked ``git archive``."""
from __future__ import annotations

import io
import subprocess
import sys
import tarfile

import pytest

from bench.common import archived_from, commit
from tests.helpers.cluster import ROOT


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=True).stdout.strip()


def test_a_benchmark_run_from_an_archive_reports_the_archives_commit(tmp_path):
    """Long benchmarks run from a ``git archive`` of a commit while the checkout changes; git's export-subst
    writes that commit into bench/ARCHIVED_FROM, and ``commit()`` there says it (``unknown`` before)."""
    try:
        head = git("rev-parse", "--short", "HEAD")
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout: there is no commit to archive")
    assert archived_from() is None   # in the checkout: git's own HEAD counts (the file holds the placeholder)
    assert commit().split("+")[0] == head
    archive = subprocess.run(["git", "archive", "HEAD", "bench/__init__.py", "bench/common.py", "bench/ARCHIVED_FROM"],
                             cwd=ROOT, capture_output=True, timeout=60, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tmp_path, filter="data")
    out = subprocess.run([sys.executable, "-c", "from bench.common import commit, checkout; print(commit()); "
                          "print(checkout()[1])"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path), "GIT_CEILING_DIRECTORIES":
                              str(tmp_path.parent)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == [f"{head} (archive)", "[]"], out.stdout
