"""Which code produced a graft: the package version and, when running from a git checkout, its commit.

Both are looked up lazily (not at import), so `peft_graft/__init__.py` may import the registry at any point.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path


def package_version() -> str:
    import peft_graft

    return peft_graft.__version__


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """HEAD of the git checkout the package is imported from, or None (installed wheel, no git, any failure).

    The package's own ``__init__.py`` must be tracked by that checkout, so a virtualenv that happens to sit
    inside some other repository does not report that repository's commit. Uncommitted edits are not visible.
    """
    package_dir = Path(__file__).resolve().parent.parent
    try:
        run = functools.partial(subprocess.run, cwd=package_dir, capture_output=True, text=True, timeout=10, check=True)
        run(["git", "ls-files", "--error-unmatch", "__init__.py"])
        commit = run(["git", "rev-parse", "HEAD"]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit if len(commit) in (40, 64) else None
