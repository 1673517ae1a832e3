"""What every benchmark shares: a hardware line, the commit it ran, and its own section of docs/results.md."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch


def hardware(device: str | None = None) -> str:
    """CPU model, cores, torch version: the line a result is reported with; with a CUDA ``device`` the GPU's
    name and torch's CUDA version too."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device).index or 0)
        return (f"{gpu} (CUDA {torch.version.cuda}), {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
                f"Python {platform.python_version()}")
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} (CPU), Python {platform.python_version()}"


ARCHIVED_FROM = Path(__file__).resolve().parent / "ARCHIVED_FROM"   # ``git archive`` writes its commit in it


def archived_from() -> str | None:
    """The short commit a ``git archive`` of the repository was made from (``bench/ARCHIVED_FROM``, filled in by
    git's ``export-subst``, .gitattributes), or None in a checkout or anything else."""
    try:
        text = ARCHIVED_FROM.read_text().strip()
    except OSError:
        return None
    return text if text and "$" not in text else None


def checkout(*paths: str) -> tuple[str, list[str]]:
    """The checkout's short HEAD and its tracked files (under ``paths``, if given) that differ from it; in an
    unpacked ``git archive`` (a copy a long benchmark runs from while the checkout changes) ``"<commit>
    (archive)"`` and no files, since what was edited there is not known; ``("unknown", [])`` otherwise."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *paths], cwd=root,
                                capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        archived = archived_from()
        return (f"{archived} (archive)" if archived else "unknown"), []
    return head, [line[3:] for line in status.splitlines() if line.strip()]


def commit(*paths: str) -> str:
    """The checkout's short HEAD, with ``+changes`` when tracked files (under ``paths``, if given) differ
    from it; an archive's commit (``checkout``); ``unknown`` anywhere else."""
    head, dirty = checkout(*paths)
    return head + ("+changes" if dirty else "")


def write_section(name: str, body: str, path: Path) -> None:
    """Replace (or append) the section between ``<!-- name:begin -->`` and ``<!-- name:end -->``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    section = f"{begin}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Measured results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def shown(path: Path) -> str:
    """``path`` relative to the repository when inside it (for the docs), else absolute."""
    root = Path(__file__).resolve().parents[1]
    path = Path(path).resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
