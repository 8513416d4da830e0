"""Releases of real git repositories: versions from conventional commits and tags, annotated
tags pushed to a bare "remote", notes, the releases table, and every refusal with its reason.

A commit counts as verified in the last environment when the history DB holds a "deployed"
row for it there, which is what a verified deployment records.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cicd_dagster.config import ControlConfig, load_control_config
from cicd_dagster.git import GitError, Mirror, TagExistsError, check_tag_name
from cicd_dagster.stages.context import StageError
from cicd_dagster.stages.release import (
    ReleaseRefused,
    make_release,
    plan_release,
    release_diff,
)
from cicd_dagster.store import DeploymentRecord, HistoryStore
from tests.support import commit, control_config, git

CICD = [sys.executable, "-m", "cicd_dagster"]
ENVIRONMENTS = "environments:\n  - name: staging\n  - name: prod\n"


class Project:
    """A working repository, the bare remote cicd.yaml names, and the control plane."""

    def __init__(self, tmp_path: Path, repo_extra: str = "", environments: str = ENVIRONMENTS):
        self.work = tmp_path / "work"
        self.remote = tmp_path / "remote.git"
        self.tmp_path = tmp_path
        self.root = commit(self.work, {"README.md": "shop\n"}, "chore: start")
        subprocess.run(
            ["git", "clone", "--quiet", "--bare", str(self.work), str(self.remote)], check=True
        )
        git(self.work, "remote", "add", "origin", str(self.remote))
        path = control_config(tmp_path, {"shop": self.remote}, environments, repo_extra)
        self.config: ControlConfig = load_control_config(path)
        self.history = HistoryStore(self.config.history_db_url)

    def commit(
        self, message: str, files: dict[str, str] | None = None, branch: str = "main"
    ) -> str:
        sha = commit(self.work, files or {f"{len(message)}.txt": message}, message)
        git(self.work, "push", "--quiet", "origin", f"HEAD:{branch}")
        return sha

    def tag(self, name: str, sha: str, *, annotated: bool = True) -> None:
        flags = ["-a", "-m", f"by hand {name}"] if annotated else []
        git(self.work, "tag", *flags, name, sha)
        git(self.work, "push", "--quiet", "origin", f"refs/tags/{name}")

    def verify(self, sha: str, environment: str = "prod") -> None:
        now = datetime.now(UTC)
        self.history.record_deployment(
            "shop",
            DeploymentRecord(
                environment=environment,
                commit_sha=sha,
                strategy="rolling",
                status="deployed",
                version=sha,
                previous_version=None,
                reason="verified",
                started_at=now,
                finished_at=now,
                duration_s=1.5,
            ),
        )

    def release(self, sha: str, pre: str | None = None):
        self.verify(sha)
        return make_release(self.config, "shop", sha, self.history, pre=pre, created_by="test")

    def remote_tag(self, name: str) -> tuple[str, str]:
        """(object type, the commit it points at) of a tag of the remote."""
        kind = git(self.remote, "cat-file", "-t", f"refs/tags/{name}")
        return kind, git(self.remote, "rev-parse", f"refs/tags/{name}^{{commit}}")

    def cicd(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CICD, "--config", str(self.config.config_path), *args],
            capture_output=True,
            text=True,
            timeout=300,
        )


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path)


def test_first_release_is_the_initial_version_tagged_and_pushed(project: Project) -> None:
    sha = project.commit("feat(api): add orders (#12)\n\nCloses #4")
    outcome = project.release(sha)
    plan = outcome.plan
    assert (plan.version, plan.previous, plan.tag, plan.bump) == (
        "0.1.0",
        None,
        "v0.1.0",
        "initial",
    )
    assert [c.info.sha for c in plan.commits] == [sha, project.root]
    # An annotated tag at the commit, pushed to the repository URL.
    assert project.remote_tag("v0.1.0") == ("tag", sha)
    message = git(project.remote, "tag", "-l", "--format=%(contents)", "v0.1.0")
    assert message.startswith("shop 0.1.0\n\n## shop 0.1.0")
    # Notes as markdown and HTML, and the release as JSON, beside each other.
    assert outcome.notes_markdown.read_text() == plan.changelog
    assert "<h3>Features</h3>" in outcome.notes_html.read_text()
    record = json.loads(outcome.notes_markdown.with_suffix(".json").read_text())
    assert record["version"] == "0.1.0" and record["notes"]["html"] == str(outcome.notes_html)
    # The releases table and the `released` event.
    rows = project.history.releases(repository="shop")
    assert rows[["version", "tag", "commit", "bump", "commit_count", "created_by"]].to_dict(
        "records"
    ) == [
        {
            "version": "0.1.0",
            "tag": "v0.1.0",
            "commit": sha,
            "bump": "initial",
            "commit_count": 2,
            "created_by": "test",
        }
    ]
    events = project.history.events(repository="shop", kind="released")
    assert list(events["message"]) == [
        f"shop 0.1.0 released (v0.1.0 at {sha[:12]}, 2 commits since the start)"
    ]
    assert "- **api:** add orders (#12)" in plan.changelog
    assert "closes #4" in plan.changelog
    assert [d["environment"] for d in plan.deployments] == ["prod"]
    # The HTML release report, linked from the row.
    assert outcome.report is not None and outcome.report.is_file()
    assert "0.1.0" in outcome.report.read_text()
    assert rows.iloc[0]["report_path"] == str(outcome.report)


def test_versions_follow_the_conventional_commits(project: Project) -> None:
    first = project.commit("feat: first")
    assert project.release(first).plan.version == "0.1.0"
    assert project.release(project.commit("fix: a bug")).plan.version == "0.1.1"
    # In 0.x a breaking change bumps the minor.
    assert project.release(project.commit("feat!: new api")).plan.version == "0.2.0"
    # Leaving 0.x is a person's decision: a tag made by hand.
    one = project.commit("docs: stable now")
    project.tag("v1.0.0", one)
    assert project.release(project.commit("perf: faster")).plan.version == "1.0.1"
    assert project.release(project.commit("feat: more")).plan.version == "1.1.0"
    breaking = project.commit("refactor: rename\n\nBREAKING CHANGE: old names are gone")
    outcome = project.release(breaking)
    assert (outcome.plan.version, outcome.plan.previous, outcome.plan.bump) == (
        "2.0.0",
        "1.1.0",
        "major",
    )
    assert [c.parsed.type for c in outcome.plan.commits] == ["refactor"]


def test_pre_releases_then_the_final_of_the_same_commit(project: Project) -> None:
    project.tag("v1.0.0", project.commit("chore: base"))
    feat = project.commit("feat: search")
    rc1 = project.release(feat, pre="rc").plan
    assert (rc1.version, rc1.tag, rc1.prerelease, rc1.bump) == (
        "1.1.0-rc.1",
        "v1.1.0-rc.1",
        True,
        "minor",
    )
    # Another rc of the same commit is refused; so is one without anything new.
    with pytest.raises(ReleaseRefused, match=r"released already as 1\.1\.0-rc\.1; a final"):
        project.release(feat, pre="rc")
    chore = project.commit("chore: tidy")
    with pytest.raises(ReleaseRefused, match=r"no release-worthy commit since v1\.1\.0-rc\.1"):
        project.release(chore, pre="rc")
    fix = project.commit("fix: search crash")
    rc2 = project.release(fix, pre="rc").plan
    assert (rc2.version, rc2.previous, rc2.bump) == ("1.1.0-rc.2", "1.1.0-rc.1", "prerelease")
    assert [c.parsed.subject for c in rc2.commits] == ["search crash", "tidy"]
    # The final of the commit last released as an rc: the suffix dropped, the notes since
    # the last final release.
    final = project.release(fix).plan
    assert (final.version, final.previous, final.prerelease) == ("1.1.0", "1.0.0", False)
    assert [c.parsed.subject for c in final.commits] == ["search crash", "tidy", "search"]
    assert project.remote_tag("v1.1.0") == ("tag", fix)
    assert project.remote_tag("v1.1.0-rc.2") == ("tag", fix)


def test_two_releases_of_the_same_commit_are_refused(project: Project) -> None:
    sha = project.commit("feat: x")
    project.release(sha)
    with pytest.raises(ReleaseRefused, match=rf"{sha[:12]} is released already as 0\.1\.0$"):
        project.release(sha)
    with pytest.raises(ReleaseRefused, match="released already"):
        project.release(sha, pre="rc")


def test_nothing_release_worthy_is_refused(project: Project) -> None:
    project.tag("v1.0.0", project.commit("feat: base"))
    project.commit("docs: typo")
    project.commit("Merge branch 'x'")
    head = project.commit("Rework everything\n\nBREAKING CHANGE: not conventional, never counts")
    with pytest.raises(ReleaseRefused, match=r"no release-worthy commit since v1\.0\.0: 3 commits"):
        project.release(head)
    assert project.history.releases().empty


def test_non_semver_tags_warn_and_do_not_count(project: Project) -> None:
    base = project.commit("feat: base")
    project.tag("v1.0.0", base)
    project.tag("v1.2", base)
    project.tag("nightly", base, annotated=False)
    sha = project.commit("fix: x")
    project.verify(sha)
    plan = plan_release(project.config, "shop", sha, project.history)
    assert (plan.version, plan.previous) == ("1.0.1", "1.0.0")
    assert sorted(plan.warnings) == [
        "tag 'nightly' ignored: it does not match the tag format 'v{version}'",
        "tag 'v1.2' ignored: '1.2' is not a SemVer version",
    ]


def test_a_commit_not_verified_in_the_last_environment_is_refused(project: Project) -> None:
    sha = project.commit("feat: x")
    project.verify(sha, environment="staging")
    with pytest.raises(ReleaseRefused, match=rf"{sha[:12]} was never verified in prod, the last"):
        plan_release(project.config, "shop", sha, project.history)
    with pytest.raises(ReleaseRefused, match="no commit 'f00d'"):
        plan_release(project.config, "shop", "f00d", project.history)


def test_without_environments_a_green_build_is_required(tmp_path: Path) -> None:
    project = Project(tmp_path, environments="")
    sha = project.commit("feat: x")
    with pytest.raises(ReleaseRefused, match="has no build: run its CI first"):
        plan_release(project.config, "shop", sha, project.history)


def test_a_release_that_does_not_descend_from_the_newest_release_is_refused(
    project: Project,
) -> None:
    base = project.commit("feat: base")
    project.tag("v1.0.0", base)
    # v1.1.0 on a line the commit does not contain (say, force-pushed away from main).
    git(project.work, "checkout", "--quiet", "-b", "side")
    side = project.commit("feat: side", {"side.txt": "x"}, branch="side")
    project.tag("v1.1.0", side)
    git(project.work, "checkout", "--quiet", "main")
    head = project.commit("fix: on main")
    with pytest.raises(ReleaseRefused, match=r"does not descend from the newest release 1\.1\.0"):
        project.release(head)


def test_tag_format_and_initial_version_from_the_config(tmp_path: Path) -> None:
    project = Project(
        tmp_path, repo_extra="release: {tag_format: 'shop/{version}', initial_version: 1.0.0}"
    )
    project.tag("v9.9.9", project.commit("feat: base"))  # another format: ignored
    outcome = project.release(project.commit("feat: x"))
    assert (outcome.plan.version, outcome.plan.tag) == ("1.0.0", "shop/1.0.0")
    assert project.remote_tag("shop/1.0.0")[0] == "tag"
    assert any("'v9.9.9' ignored" in warning for warning in outcome.plan.warnings)


def test_a_push_the_remote_refuses_leaves_nothing_behind(project: Project) -> None:
    hook = project.remote / "hooks" / "pre-receive"
    hook.write_text(
        "#!/bin/sh\nwhile read old new ref; do case $ref in refs/tags/*)\n"
        "echo 'tags are frozen' >&2; exit 1;; esac; done\n"
    )
    hook.chmod(0o755)
    sha = project.commit("feat: x")
    with pytest.raises(
        StageError, match=r"release 0\.1\.0 not made: pushing tag v0\.1\.0"
    ) as error:
        project.release(sha)
    assert not isinstance(error.value, ReleaseRefused)
    assert "tags are frozen" in str(error.value)
    mirror = Mirror(project.config.git_dir / "shop.git", str(project.remote))
    assert [tag.name for tag in mirror.tags()] == []
    assert project.history.releases().empty
    assert not (project.config.home / "release-notes" / "shop" / "0.1.0.md").exists()
    hook.unlink()
    assert project.release(sha).plan.version == "0.1.0"  # and it can be made later


def test_tags_are_validated_and_never_moved(project: Project) -> None:
    sha = project.commit("feat: x")
    mirror = Mirror(project.config.git_dir / "shop.git", str(project.remote))
    mirror.fetch()
    for bad in ["-f", "a..b", "a b", "x~1", "x^", "a:b", "@{x}", "", "x.lock", "a/"]:
        with pytest.raises(ValueError, match="not a valid tag name"):
            check_tag_name(bad)
        with pytest.raises(ValueError, match="not a valid tag name"):
            mirror.create_tag(bad, sha, "m", tagger_name="t", tagger_email="t@x")
    mirror.create_tag("v1.0.0", sha, "m", tagger_name="t", tagger_email="t@x")
    with pytest.raises(TagExistsError, match="tags never move"):
        mirror.create_tag("v1.0.0", sha, "again", tagger_name="t", tagger_email="t@x")
    mirror.push_tag("v1.0.0")
    # The remote refuses to replace a tag it has: pushes are never forced.
    mirror.delete_tag("v1.0.0")
    other = project.commit("fix: y")
    mirror.fetch()  # brings v1.0.0 back from the remote
    assert {tag.name: tag.sha for tag in mirror.tags()} == {"v1.0.0": sha}
    git(project.remote, "tag", "-d", "v1.0.0")
    git(project.remote, "tag", "v1.0.0", other)  # moved on the remote by someone else
    with pytest.raises(GitError, match=r"pushing tag v1\.0\.0"):
        mirror.push_tag("v1.0.0")


def test_release_diff(project: Project) -> None:
    one = project.commit("feat: one", {"a.txt": "a\n"})
    project.release(one)
    commit(project.work, {"b.txt": "b\n"}, "fix: two")
    git(project.work, "-c", "user.name=Other", "-c", "user.email=o@example.com",
        "commit", "--quiet", "--amend", "--reset-author", "--no-edit")  # fmt: skip
    git(project.work, "push", "--quiet", "origin", "HEAD:main")
    two = git(project.work, "rev-parse", "HEAD")
    project.release(two)
    diff = release_diff(project.config, project.history, "shop", "0.1.0", "v0.1.1")
    assert (diff["from"]["commit"], diff["to"]["commit"]) == (one, two)
    assert [c["subject"] for c in diff["commits"]] == ["two"]
    assert diff["authors"] == [{"name": "Other", "email": "o@example.com", "commits": 1}]
    assert [(f["path"], f["status"]) for f in diff["files"]] == [("b.txt", "A")]
    assert diff["from"]["tests"] is None  # no build recorded for it
    with pytest.raises(ValueError, match=r"has no release '9\.9\.9'"):
        release_diff(project.config, project.history, "shop", "0.1.0", "9.9.9")


@pytest.mark.slow  # Dagster runs in `cicd` processes
def test_cli_dry_run_release_history_and_diff(project: Project) -> None:
    sha = project.commit("feat: x <b>bold</b>")
    project.verify(sha)
    planned = project.cicd("release", "shop", "--dry-run", "--json")
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    assert {key: plan[key] for key in ("status", "version", "previous", "tag", "commit")} == {
        "status": "planned",
        "version": "0.1.0",
        "previous": None,
        "tag": "v0.1.0",
        "commit": sha,
    }
    assert plan["commits"][0]["sha"] == sha
    assert not git(project.remote, "tag", "-l")  # a dry run tags nothing

    released = project.cicd("release", "shop", "--json")  # default: prod's verified commit
    assert released.returncode == 0, released.stderr
    report = json.loads(released.stdout)
    assert (report["status"], report["version"], report["tag"]) == ("released", "0.1.0", "v0.1.0")
    assert Path(report["notes"]["html"]).is_file()
    assert Path(report["report"]).is_file()
    assert "&lt;b&gt;bold&lt;/b&gt;" in Path(report["notes"]["html"]).read_text()

    again = project.cicd("release", "shop", "--commit", sha, "--json")
    assert again.returncode == 1
    refused = json.loads(again.stdout)
    assert refused["status"] == "refused" and "released already" in refused["reason"]

    fix = project.commit("fix: y")
    project.verify(fix)
    human = project.cicd("release", "create", "shop")
    assert human.returncode == 0, human.stderr
    assert human.stdout.startswith("## shop 0.1.1")
    assert "shop 0.1.1 is v0.1.1" in human.stderr

    history = project.cicd("history", "releases", "--repo", "shop", "--format", "json")
    rows = json.loads(history.stdout)
    assert [row["version"] for row in rows] == ["0.1.1", "0.1.0"]
    assert rows[0]["changelog"].startswith("## shop 0.1.1")

    diff = project.cicd("release", "diff", "shop", "0.1.0", "0.1.1", "--json")
    assert diff.returncode == 0, diff.stderr
    assert [c["subject"] for c in json.loads(diff.stdout)["commits"]] == ["y"]
    assert project.cicd("release", "diff", "shop", "0.1.0", "nope").returncode == 2
    assert project.cicd("release", "shop", "--pre", "r c").returncode == 2
    assert project.cicd("release", "nosuch").returncode == 2


def test_an_existing_tag_of_the_next_version_is_never_moved(project: Project) -> None:
    project.tag("v1.0.0", project.commit("feat: base"))
    head = project.commit("fix: x")
    # A tag of that name that is no release (it names a tree, not a commit).
    git(project.work, "tag", "v1.0.1", git(project.work, "rev-parse", "HEAD^{tree}"))
    git(project.work, "push", "--quiet", "origin", "refs/tags/v1.0.1")
    with pytest.raises(ReleaseRefused, match=r"tag v1\.0\.1 exists already .*: tags never move"):
        project.release(head)


def test_a_recorded_version_whose_tag_was_deleted_is_not_made_again(project: Project) -> None:
    project.release(project.commit("feat: x"))
    git(project.remote, "tag", "-d", "v0.1.0")
    with pytest.raises(ReleaseRefused, match=r"0\.1\.0 is recorded already, but its tag v0\.1\.0"):
        project.release(project.commit("fix: y"))
