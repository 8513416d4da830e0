"""cicd_dagster.git against real repositories made with `git init` in tmp_path."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from cicd_dagster.git import (
    GitError,
    Mirror,
    RemoteRef,
    RemoteState,
    checkout_id,
    ls_remote,
    prune_workspaces,
    select_refs,
)

AUTHOR_DATE = "2024-03-01T12:00:00+02:00"
COMMIT_DATE = "2024-03-02T08:30:00-05:00"
# Names git accepts that a shell would run; `touch PWNED` lands in the test's cwd.
HOSTILE_BRANCHES = [
    "x$(touch${IFS}PWNED)",
    "`touch${IFS}PWNED`",
    ";touch${IFS}PWNED;",
    "a|touch${IFS}PWNED",
    "x&&touch${IFS}PWNED",
    'it\'s"quoted"',
    "日本語/ブランチ",
]


def git(cwd: Path, *args: str) -> str:
    """Run git for test setup: fixed identity and dates, no user or system config."""
    env = {
        **os.environ,
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_DATE": AUTHOR_DATE,
        "GIT_COMMITTER_DATE": COMMIT_DATE,
    }
    identity = ["-c", "user.name=Zoë Tester", "-c", "user.email=zoe@example.com"]
    result = subprocess.run(
        ["git", *identity, *args], cwd=cwd, env=env, check=True, capture_output=True, text=True
    )
    return result.stdout.strip()


def commit(repo: Path, message: str) -> str:
    git(repo, "add", "--all")
    git(repo, "commit", "--quiet", "--allow-empty", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    """A repository with main, two release branches, a feature branch and three tags."""
    repo = tmp_path / "origin"
    repo.mkdir()
    git(repo, "init", "--quiet", "-b", "main")
    (repo / "README.md").write_text("hello\n")
    commit(repo, "root")
    for branch in ("release/1.x", "release/2.x", "feature/login"):
        git(repo, "branch", "--", branch)
    git(repo, "tag", "-a", "-m", "first release", "--", "v1.0")
    git(repo, "tag", "--", "v1.1")
    git(repo, "tag", "--", "nightly")
    return repo


@pytest.fixture
def mirror(origin: Path, tmp_path: Path) -> Mirror:
    fetched = Mirror(tmp_path / "home" / "git" / "origin.git", str(origin))
    fetched.fetch()
    return fetched


@pytest.fixture(autouse=True)
def _cwd_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Anything a hostile name managed to execute would create PWNED here.
    monkeypatch.chdir(tmp_path)


def assert_nothing_executed(tmp_path: Path) -> None:
    assert not list(tmp_path.rglob("PWNED"))


# --- ls_remote / select_refs -------------------------------------------------------------


def test_ls_remote_lists_branches_tags_and_default_branch(origin: Path) -> None:
    state = ls_remote(str(origin))

    assert state.default_branch == "main"
    assert {(ref.name, ref.kind, ref.short) for ref in state.refs} == {
        ("refs/heads/main", "branch", "main"),
        ("refs/heads/release/1.x", "branch", "release/1.x"),
        ("refs/heads/release/2.x", "branch", "release/2.x"),
        ("refs/heads/feature/login", "branch", "feature/login"),
        ("refs/tags/v1.0", "tag", "v1.0"),
        ("refs/tags/v1.1", "tag", "v1.1"),
        ("refs/tags/nightly", "tag", "nightly"),
    }
    assert [ref.name for ref in state.refs] == sorted(ref.name for ref in state.refs)


def test_ls_remote_gives_the_commit_an_annotated_tag_points_at(origin: Path) -> None:
    head = git(origin, "rev-parse", "HEAD")
    tag_object = git(origin, "rev-parse", "refs/tags/v1.0")
    assert tag_object != head  # annotated: the ref names a tag object

    refs = {ref.short: ref.sha for ref in ls_remote(str(origin)).refs}

    assert refs["v1.0"] == head
    assert refs["v1.1"] == head


def test_ls_remote_follows_the_remote_default_branch(origin: Path) -> None:
    git(origin, "checkout", "--quiet", "release/2.x")
    assert ls_remote(str(origin)).default_branch == "release/2.x"


def test_ls_remote_of_vanished_repository_names_the_url(origin: Path) -> None:
    ls_remote(str(origin))
    shutil.rmtree(origin)

    with pytest.raises(GitError, match="is unreachable") as error:
        ls_remote(str(origin))
    assert str(origin) in str(error.value)


def _state(
    branches: Sequence[str], tags: Sequence[str] = (), default_branch: str | None = "main"
) -> RemoteState:
    refs = [RemoteRef(f"refs/heads/{b}", "branch", b, "0" * 40) for b in branches]
    refs += [RemoteRef(f"refs/tags/{t}", "tag", t, "1" * 40) for t in tags]
    return RemoteState(refs=refs, default_branch=default_branch)


SELECTABLE = _state(
    ["main", "release/1.x", "release/2.x", "releases", "feature/a"], ["v1.0", "v2.0", "x"]
)


def test_select_refs_matches_branch_and_tag_patterns_sorted_by_name() -> None:
    selected = select_refs(SELECTABLE, branches=["release/*"], tags=["v*"])
    assert [ref.name for ref in selected] == [
        "refs/heads/release/1.x",
        "refs/heads/release/2.x",
        "refs/tags/v1.0",
        "refs/tags/v2.0",
    ]


def test_select_refs_without_branch_patterns_takes_only_the_default_branch() -> None:
    assert [ref.short for ref in select_refs(SELECTABLE, None, [])] == ["main"]


def test_select_refs_explicit_default_branch_overrides_the_remote() -> None:
    selected = select_refs(SELECTABLE, None, [], default_branch="release/1.x")
    assert [ref.short for ref in selected] == ["release/1.x"]


def test_select_refs_matches_case_sensitively_and_nothing_when_no_patterns() -> None:
    assert select_refs(SELECTABLE, ["MAIN", "Release/*"], ["V*"]) == []
    assert select_refs(_state(["main"], default_branch=None), None, []) == []


def test_select_refs_treats_a_default_branch_name_literally() -> None:
    state = _state(["feature[1]", "feature1"], default_branch="feature[1]")
    assert [ref.short for ref in select_refs(state, None, [])] == ["feature[1]"]


# --- hostile names -----------------------------------------------------------------------


def test_hostile_branch_names_round_trip_and_never_execute(origin: Path, tmp_path: Path) -> None:
    head = git(origin, "rev-parse", "HEAD")
    for branch in HOSTILE_BRANCHES:
        git(origin, "branch", "--", branch)
    # git refuses `git branch -rf`, but a ref starting with a dash can still exist.
    git(origin, "update-ref", "refs/heads/-rf", head)

    shorts = {ref.short for ref in ls_remote(str(origin)).refs}
    assert {*HOSTILE_BRANCHES, "-rf"} <= shorts

    mirror = Mirror(tmp_path / "hostile.git", str(origin))
    mirror.fetch()
    for branch in [*HOSTILE_BRANCHES, "-rf"]:
        assert mirror.resolve(branch) == head
    assert {*HOSTILE_BRANCHES, "-rf"} <= set(mirror.refs_containing(head))
    assert_nothing_executed(tmp_path)


@pytest.mark.parametrize(
    "rev",
    ["--git-dir", "-rf", "--output=PWNED", ";touch PWNED;", "$(touch PWNED)", "HEAD\ntouch"],
)
def test_resolve_never_parses_a_rev_as_an_option(mirror: Mirror, tmp_path: Path, rev: str) -> None:
    with pytest.raises(GitError, match="no commit named"):
        mirror.resolve(rev)
    assert_nothing_executed(tmp_path)


@pytest.mark.parametrize(
    "url",
    ["--upload-pack=touch PWNED", "-u touch PWNED", "$(touch PWNED)", "ext::sh -c touch% PWNED"],
)
def test_hostile_urls_are_never_run(tmp_path: Path, url: str) -> None:
    with pytest.raises(GitError, match="unreachable"):
        ls_remote(url)
    with pytest.raises(GitError, match="failed"):
        Mirror(tmp_path / "evil.git", url).fetch()
    assert_nothing_executed(tmp_path)


@pytest.mark.parametrize("sha", ["HEAD", "--all", "abc", "g" * 40, "a" * 41, "1234567 "])
def test_commit_shas_are_validated_before_reaching_git(mirror: Mirror, sha: str) -> None:
    with pytest.raises(ValueError, match="not a commit sha"):
        mirror.has_commit(sha)
    with pytest.raises(ValueError, match="not a commit sha"):
        mirror.commit_info(sha)


def test_git_error_shows_the_command_and_stderr_without_url_credentials() -> None:
    error = GitError(
        "boom",
        ["ls-remote", "--", "https://ci:s3cr3t@example.com/x.git"],
        "  fatal: could not read https://ci:s3cr3t@example.com/x.git\n",
    )
    assert str(error) == (
        "boom\n"
        "command: git ls-remote -- https://***@example.com/x.git\n"
        "stderr: fatal: could not read https://***@example.com/x.git"
    )


# --- Mirror.fetch ------------------------------------------------------------------------


def test_fetch_follows_force_push_and_branch_deletion(origin: Path, mirror: Mirror) -> None:
    git(origin, "checkout", "--quiet", "feature/login")
    (origin / "login.py").write_text("v1\n")
    first = commit(origin, "login v1")
    mirror.fetch()
    assert mirror.resolve("feature/login") == first

    git(origin, "reset", "--quiet", "--hard", "main")
    (origin / "login.py").write_text("v2\n")
    rewritten = commit(origin, "login v2")
    mirror.fetch()
    assert mirror.resolve("feature/login") == rewritten
    assert "feature/login" not in mirror.refs_containing(first)

    git(origin, "checkout", "--quiet", "main")
    git(origin, "branch", "--quiet", "-D", "feature/login")
    mirror.fetch()
    with pytest.raises(GitError, match="feature/login"):
        mirror.resolve("feature/login")


def test_fetch_follows_a_changed_url(origin: Path, mirror: Mirror, tmp_path: Path) -> None:
    moved = origin.rename(tmp_path / "moved")
    new_head = commit(moved, "after the move")

    Mirror(mirror.path, str(moved)).fetch()

    assert Mirror(mirror.path, str(moved)).resolve("main") == new_head


def test_concurrent_fetches_of_a_new_mirror_both_succeed(origin: Path, tmp_path: Path) -> None:
    mirror = Mirror(tmp_path / "concurrent.git", str(origin))
    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(lambda _: mirror.fetch(), range(3)))
    assert mirror.resolve("main") == git(origin, "rev-parse", "HEAD")


def test_fetch_of_vanished_repository_names_the_url(origin: Path, mirror: Mirror) -> None:
    shutil.rmtree(origin)
    with pytest.raises(GitError) as error:
        mirror.fetch()
    assert str(origin) in str(error.value)


# --- commits -----------------------------------------------------------------------------

MESSAGE = "Grüße: fix ünïcode handling 🚀\n\nBody line one.\n\n  indented — line\n"


@pytest.fixture
def changes(origin: Path) -> str:
    """A commit that adds, modifies, deletes, renames and adds a binary file."""
    (origin / "old name.txt").write_text("one\ntwo\nthree\nfour\nfive\n")
    (origin / "gone.txt").write_text("bye\n")
    commit(origin, "before")
    (origin / "README.md").write_text("hello\nworld\n")
    (origin / "dir with space").mkdir()
    (origin / "dir with space" / "new\nline.txt").write_text("a\nb\n")
    (origin / "gone.txt").unlink()
    (origin / "old name.txt").rename(origin / "new name.txt")
    (origin / "logo.bin").write_bytes(bytes(range(256)))
    return commit(origin, MESSAGE)


def test_commit_info_reports_metadata_and_changed_files(
    origin: Path, mirror: Mirror, changes: str
) -> None:
    mirror.fetch()
    info = mirror.commit_info(changes)

    assert info.sha == changes
    assert info.parents == [git(origin, "rev-parse", f"{changes}^")]
    assert (info.author_name, info.author_email) == ("Zoë Tester", "zoe@example.com")
    assert info.authored_at == datetime(2024, 3, 1, 12, tzinfo=timezone(timedelta(hours=2)))
    assert info.committed_at == datetime.fromisoformat(COMMIT_DATE)
    assert info.committed_at.utcoffset() == timedelta(hours=-5)
    assert info.message == MESSAGE.rstrip("\n")
    assert info.subject == "Grüße: fix ünïcode handling 🚀"
    by_path = {change.path: change for change in info.changed_files}
    assert set(by_path) == {
        "README.md",
        "dir with space/new\nline.txt",
        "gone.txt",
        "new name.txt",
        "logo.bin",
    }
    assert (by_path["README.md"].status, by_path["README.md"].added) == ("M", 1)
    assert by_path["README.md"].deleted == 0
    assert by_path["dir with space/new\nline.txt"].status == "A"
    assert (by_path["gone.txt"].status, by_path["gone.txt"].deleted) == ("D", 1)
    renamed = by_path["new name.txt"]
    assert (renamed.status, renamed.old_path, renamed.added, renamed.deleted) == (
        "R",
        "old name.txt",
        0,
        0,
    )
    assert (by_path["logo.bin"].added, by_path["logo.bin"].deleted) == (None, None)


def test_commit_info_of_a_root_commit_lists_every_file_as_added(
    origin: Path, mirror: Mirror
) -> None:
    root = git(origin, "rev-list", "--max-parents=0", "HEAD")
    info = mirror.commit_info(root)
    assert info.parents == []
    assert [(c.path, c.status, c.added) for c in info.changed_files] == [("README.md", "A", 1)]


def test_commit_info_of_a_merge_compares_with_the_first_parent(origin: Path) -> None:
    git(origin, "checkout", "--quiet", "feature/login")
    (origin / "login.py").write_text("login\n")
    feature = commit(origin, "login")
    git(origin, "checkout", "--quiet", "main")
    git(origin, "merge", "--quiet", "--no-ff", "-m", "merge login", "feature/login")
    mirror = Mirror(origin.parent / "merge.git", str(origin))
    mirror.fetch()

    info = mirror.commit_info(mirror.resolve("main"))

    assert info.parents[1] == feature
    assert [(c.path, c.status) for c in info.changed_files] == [("login.py", "A")]


def test_commit_info_accepts_an_abbreviated_sha(mirror: Mirror, origin: Path) -> None:
    head = git(origin, "rev-parse", "HEAD")
    assert mirror.commit_info(head[:8].upper()).sha == head
    assert mirror.has_commit(head[:7])
    assert not mirror.has_commit("0" * 40)
    with pytest.raises(GitError, match="no commit named"):
        mirror.commit_info("0" * 40)


def test_read_file_returns_text_or_none(origin: Path, mirror: Mirror, changes: str) -> None:
    mirror.fetch()
    assert mirror.read_file(changes, "README.md") == "hello\nworld\n"
    assert mirror.read_file(changes, "dir with space/new\nline.txt") == "a\nb\n"
    assert mirror.read_file(changes, "gone.txt") is None
    assert mirror.read_file(changes, "dir with space") is None
    assert mirror.read_file(changes, "--help") is None
    with pytest.raises(ValueError, match="not a commit sha"):
        mirror.read_file(f"{changes}^", "gone.txt")
    assert mirror.read_file(git(origin, "rev-parse", f"{changes}^"), "gone.txt") == "bye\n"


def test_refs_containing_lists_branches_with_the_commit(origin: Path, mirror: Mirror) -> None:
    git(origin, "checkout", "--quiet", "feature/login")
    feature = commit(origin, "feature only")
    mirror.fetch()
    root = git(origin, "rev-list", "--max-parents=0", "HEAD")

    assert mirror.refs_containing(feature) == ["feature/login"]
    assert mirror.refs_containing(root) == ["feature/login", "main", "release/1.x", "release/2.x"]


# --- checkout ----------------------------------------------------------------------------


def tracked_tree(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): path.read_text()
        for path in directory.rglob("*")
        if path.is_file() and ".git" not in path.relative_to(directory).parts
    }


def test_checkout_gives_exactly_the_commits_tree(
    origin: Path, mirror: Mirror, changes: str, tmp_path: Path
) -> None:
    before = git(origin, "rev-parse", f"{changes}^")
    mirror.fetch()
    dest = mirror.checkout(before, tmp_path / "workspaces" / before)

    assert tracked_tree(dest) == {
        "README.md": "hello\n",
        "gone.txt": "bye\n",
        "old name.txt": "one\ntwo\nthree\nfour\nfive\n",
    }
    assert git(dest, "rev-parse", "HEAD") == before


def test_checkout_keeps_build_outputs_and_replaces_an_edited_tree(
    origin: Path, mirror: Mirror, tmp_path: Path
) -> None:
    head = git(origin, "rev-parse", "HEAD")
    dest = mirror.checkout(head, tmp_path / "ws")
    first_id = checkout_id(dest)
    (dest / "dist").mkdir()
    (dest / "dist" / "app.whl").write_text("built")  # untracked: the build's output

    assert mirror.checkout(head, dest) == dest
    assert (dest / "dist" / "app.whl").exists()
    assert checkout_id(dest) == first_id

    (dest / "README.md").write_text("tampered\n")
    mirror.checkout(head, dest)
    assert (dest / "README.md").read_text() == "hello\n"
    assert not (dest / "dist").exists()
    assert checkout_id(dest) not in ("", first_id)


def test_checkout_of_another_commit_replaces_the_workspace(
    origin: Path, mirror: Mirror, changes: str, tmp_path: Path
) -> None:
    mirror.fetch()
    dest = mirror.checkout(git(origin, "rev-parse", f"{changes}^"), tmp_path / "ws")
    mirror.checkout(changes, dest)
    assert git(dest, "rev-parse", "HEAD") == changes
    assert not (dest / "gone.txt").exists()


def test_concurrent_checkouts_of_the_same_commit_all_succeed(
    origin: Path, mirror: Mirror, tmp_path: Path
) -> None:
    head = git(origin, "rev-parse", "HEAD")
    dest = tmp_path / "workspaces" / head
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: mirror.checkout(head, dest), range(4)))
    assert results == [dest] * 4
    assert tracked_tree(dest) == {"README.md": "hello\n"}


# --- retention ---------------------------------------------------------------------------


def test_prune_workspaces_keeps_the_newest_and_the_protected(tmp_path: Path) -> None:
    root = tmp_path / "workspaces"
    folders = []
    for age in range(5):  # folder 0 is the newest
        folder = root / f"ws{age}"
        (folder / "sub").mkdir(parents=True)
        os.utime(folder, (1_700_000_000 - age * 60,) * 2)
        folders.append(folder)
    (root / "ws9.lock").touch()  # files are not workspaces
    (root / "link").symlink_to(folders[4])

    removed = prune_workspaces(root, keep=2, protect=[folders[3]])

    assert sorted(removed) == [folders[2], folders[4]]
    assert sorted(p.name for p in root.iterdir()) == ["link", "ws0", "ws1", "ws3", "ws9.lock"]


def test_prune_workspaces_of_a_missing_root_removes_nothing(tmp_path: Path) -> None:
    assert prune_workspaces(tmp_path / "nowhere", keep=0) == []
