"""The embedded demo: a small real Python project committed into a local git repository."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

PROJECT = Path(__file__).with_name("project")
DEMO_AUTHOR = ["-c", "user.name=Demo Developer", "-c", "user.email=demo@example.com"]


def create_demo_repository(path: Path) -> bool:
    """Make `path` a git repository holding the demo project; False if it already exists."""
    if (path / ".git").exists() or (path / "HEAD").exists():
        return False
    shutil.copytree(
        PROJECT, path, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True
    )
    git = ["git", *DEMO_AUTHOR, "-C", str(path)]
    subprocess.run([*git, "init", "--quiet", "--initial-branch=main"], check=True)
    subprocess.run([*git, "add", "--all"], check=True)
    subprocess.run([*git, "commit", "--quiet", "-m", "feat: the demo shop"], check=True)
    return True
