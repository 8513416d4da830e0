"""cicd_dagster.runner with real bash processes."""

from __future__ import annotations

import os
import time
import tracemalloc
from pathlib import Path

import pytest

from cicd_dagster import runner
from cicd_dagster.runner import MAX_LINE_CHARS, SecretMasker, StepResult, base_environment, run_step

SECRET = "hunter2-s3cr3t"


def step(command: str, tmp_path: Path, **options: object) -> StepResult:
    """run_step in tmp_path with the base environment, logging to tmp_path/step.log."""
    settings: dict[str, object] = {
        "cwd": tmp_path,
        "env": base_environment(),
        "timeout_s": 30,
        "log_path": tmp_path / "logs" / "step.log",
        **options,
    }
    return run_step(command, **settings)  # type: ignore[arg-type]


def process_is_running(pid: int) -> bool:
    # A killed grandchild is re-parented; until its new parent reaps it, it is a zombie.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_until_gone(pid: int, within_s: float = 2.0) -> bool:
    deadline = time.monotonic() + within_s
    while process_is_running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# --- exit codes --------------------------------------------------------------------------


def test_successful_step_is_ok(tmp_path: Path) -> None:
    result = step("true", tmp_path)
    assert (result.exit_code, result.ok, result.timed_out) == (0, True, False)
    assert result.command == "true"
    assert result.log_path == tmp_path / "logs" / "step.log"


def test_failing_step_reports_its_exit_code(tmp_path: Path) -> None:
    result = step("echo before; exit 3", tmp_path)
    assert (result.exit_code, result.ok) == (3, False)
    assert result.log_tail == "before"


def test_step_stops_at_the_first_failure_including_inside_a_pipeline(tmp_path: Path) -> None:
    result = step("false | cat; echo unreachable", tmp_path)
    assert result.exit_code == 1
    assert "unreachable" not in result.log_tail


def test_step_killed_by_a_signal_reports_it_like_a_shell(tmp_path: Path) -> None:
    assert step("kill -KILL $$", tmp_path).exit_code == 128 + 9


def test_step_runs_in_cwd_with_no_stdin(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    result = step("pwd; cat; echo done", tmp_path, cwd=tmp_path / "work")
    assert result.log_tail == f"{tmp_path / 'work'}\ndone"


# --- streaming and the log ---------------------------------------------------------------


def test_output_streams_to_on_line_in_order_and_to_the_log(tmp_path: Path) -> None:
    lines: list[str] = []
    command = "echo one; echo two >&2; printf 'three\\r\\nfour'"
    result = step(command, tmp_path, on_line=lines.append)

    assert lines == ["one", "two", "three", "four"]
    assert result.log_path.read_text() == f"$ {command}\none\ntwo\nthree\nfour\n"


def test_log_is_appended_to_across_steps(tmp_path: Path) -> None:
    step("echo first", tmp_path)
    step("echo second", tmp_path)
    log = (tmp_path / "logs" / "step.log").read_text()
    assert log == "$ echo first\nfirst\n$ echo second\nsecond\n"


def test_tail_keeps_only_the_last_lines(tmp_path: Path) -> None:
    result = step("seq 1 100", tmp_path, tail_lines=3)
    assert result.log_tail == "98\n99\n100"


def test_invalid_utf8_output_is_replaced_not_fatal(tmp_path: Path) -> None:
    result = step(r"printf 'caf\xc3\xa9 \xff end\n'", tmp_path)
    assert result.log_tail == "café \N{REPLACEMENT CHARACTER} end"


# --- environment -------------------------------------------------------------------------


def test_step_gets_exactly_the_environment_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONTROL_PLANE_TOKEN", "must-not-leak")
    result = step("env", tmp_path, env={"ONLY": "this"})
    variables = {line.split("=", 1)[0] for line in result.log_tail.splitlines()}
    # bash itself always adds PWD, SHLVL and _.
    assert variables - {"PWD", "SHLVL", "_"} == {"ONLY"}


def test_base_environment_is_minimal_plus_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTROL_PLANE_TOKEN", "must-not-leak")
    network = {"SSL_CERT_FILE": "/ca.pem", "PIP_INDEX_URL": "https://mirror", "UV_OFFLINE": "1"}
    for name, value in network.items():
        monkeypatch.setenv(name, value)
    env = base_environment({"CI": "true", "LANG": "de_DE.UTF-8"})
    assert "CONTROL_PLANE_TOKEN" not in env
    # How the machine reaches package indexes passes through: installs need it.
    assert {name: env[name] for name in network} == network
    machine_settings = {n for n in env if n.startswith(("PIP_", "UV_", "SSL_", "REQUESTS_"))}
    minimal = {"PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER", "CI", "CURL_CA_BUNDLE"}
    assert set(env) - machine_settings <= minimal
    assert {"PATH", "HOME", "TMPDIR"} <= set(env)
    assert (env["CI"], env["LANG"], env["LC_ALL"]) == ("true", "de_DE.UTF-8", "C.UTF-8")


def test_hostile_environment_value_is_data_not_code(tmp_path: Path) -> None:
    pwned = tmp_path / "pwned"
    hostile = f"$(touch {pwned}); `touch {pwned}`"
    result = step('echo "$BRANCH"', tmp_path, env=base_environment({"BRANCH": hostile}))
    assert result.log_tail == hostile
    assert not pwned.exists()


# --- secrets -----------------------------------------------------------------------------


def test_secrets_are_masked_in_log_tail_and_on_line(tmp_path: Path) -> None:
    lines: list[str] = []
    command = (
        'echo "$TOKEN"; echo "before-${TOKEN}-after"; '
        # Written in two pieces with a pause: two reads, one line.
        "printf 'hunter2-'; sleep 0.2; printf 's3cr3t done\\n'"
    )
    result = step(
        command,
        tmp_path,
        env=base_environment({"TOKEN": SECRET}),
        masker=SecretMasker([SECRET]),
        on_line=lines.append,
    )
    assert lines == ["***", "before-***-after", "*** done"]
    assert result.log_tail == "***\nbefore-***-after\n*** done"
    assert SECRET not in result.log_path.read_text()


def test_secret_in_the_command_is_masked_in_the_header(tmp_path: Path) -> None:
    result = step(f"echo {SECRET}", tmp_path, masker=SecretMasker([SECRET]))
    assert result.log_path.read_text() == "$ echo ***\n***\n"


def test_masker_ignores_empty_and_short_values() -> None:
    masker = SecretMasker(["", "abc", "abcd"])
    assert masker.mask("a abc abcd") == "a abc ***"


def test_masker_masks_the_longest_secret_first() -> None:
    masker = SecretMasker(["pass", "password123"])
    assert masker.mask("password123 pass") == "*** ***"


def test_masker_masks_each_line_of_a_multiline_secret() -> None:
    masker = SecretMasker(["-----BEGIN KEY-----\nAAAAsecret\n-----END KEY-----"])
    assert masker.mask("AAAAsecret") == "***"


def test_masker_without_secrets_changes_nothing() -> None:
    assert SecretMasker([]).mask("a*b.c") == "a*b.c"


# --- timeouts and process cleanup --------------------------------------------------------


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    command = f"sleep 1000 & echo $! > {pid_file}; echo started; wait"

    result = step(command, tmp_path, timeout_s=0.5)

    assert result.timed_out
    assert (result.exit_code, result.ok) == (None, False)
    assert result.log_tail == "started\nstep timed out after 0.5 s"
    assert result.duration_s < 10  # not the 1000 s of the grandchild
    assert wait_until_gone(int(pid_file.read_text()))


def test_timeout_escalates_to_sigkill_for_processes_ignoring_sigterm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "_KILL_GRACE_S", 0.3)
    pid_file = tmp_path / "stubborn.pid"
    command = f"bash -c 'trap \"\" TERM; echo $$ > {pid_file}; while :; do sleep 0.05; done'"

    result = step(command, tmp_path, timeout_s=0.5)

    assert result.timed_out
    assert wait_until_gone(int(pid_file.read_text()))


def test_background_processes_do_not_outlive_a_finished_step(tmp_path: Path) -> None:
    pid_file = tmp_path / "background.pid"
    result = step(f"sleep 1000 & echo $! > {pid_file}; echo done", tmp_path)

    assert (result.exit_code, result.timed_out, result.log_tail) == (0, False, "done")
    assert result.duration_s < 10
    assert wait_until_gone(int(pid_file.read_text()))


def test_an_error_in_on_line_still_stops_the_step(tmp_path: Path) -> None:
    pid_file = tmp_path / "step.pid"

    def explode(line: str) -> None:
        raise RuntimeError(line)

    with pytest.raises(RuntimeError, match="boom"):
        step(f"echo $$ > {pid_file}; echo boom; sleep 1000", tmp_path, on_line=explode)
    assert wait_until_gone(int(pid_file.read_text()))


# --- bounded memory ----------------------------------------------------------------------

FIFTY_MB = 50 * 1000 * 1000


def peak_python_memory(command: str, tmp_path: Path) -> tuple[int, StepResult]:
    tracemalloc.start()
    try:
        result = step(command, tmp_path, tail_lines=5)
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


def test_fifty_megabytes_of_lines_use_bounded_memory(tmp_path: Path) -> None:
    peak, result = peak_python_memory(
        # Not `yes | head`: under pipefail, yes dying of SIGPIPE fails the step.
        f"head -c {FIFTY_MB} < <(yes \"$(printf '%0999d' 0)\")",
        tmp_path,
    )
    assert result.ok
    assert peak < 8 * 1024 * 1024
    assert os.path.getsize(result.log_path) > FIFTY_MB
    assert result.log_tail.splitlines() == ["0" * 999] * 5


def test_one_huge_line_without_newline_is_cut_into_bounded_pieces(tmp_path: Path) -> None:
    peak, result = peak_python_memory(f"head -c {FIFTY_MB} /dev/zero | tr '\\0' x", tmp_path)
    assert result.ok
    assert peak < 8 * 1024 * 1024
    assert all(0 < len(line) <= MAX_LINE_CHARS for line in result.log_tail.splitlines())
    assert os.path.getsize(result.log_path) > FIFTY_MB
