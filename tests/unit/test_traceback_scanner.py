"""The traceback scanner of the monitor, on log text as Python services write it, and
the reads of a slot's log between scans that feed it."""

from cicd_dagster.deploy.local import LocalSupervisor
from cicd_dagster.deploy.monitor import scan_tracebacks
from cicd_dagster.deploy.target import LogChunk

SIMPLE = b"""\
127.0.0.1 - GET /orders 200
Traceback (most recent call last):
  File "/srv/app.py", line 12, in handle
    price = compute(order)
            ^^^^^^^^^^^^^^
  File "/srv/pricing.py", line 3, in compute
    raise ValueError("negative price")
ValueError: negative price
127.0.0.1 - GET /orders 500
"""

CHAINED = b"""\
Traceback (most recent call last):
  File "/srv/app.py", line 5, in load
    return int(text)
ValueError: invalid literal for int() with base 10: 'x'

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "/srv/app.py", line 9, in handle
    load(text)
RuntimeError: cannot load the order
after
"""


def test_a_complete_traceback_gives_its_exception_line_and_everything_is_consumed():
    found, consumed = scan_tracebacks(SIMPLE)
    assert [t.exception for t in found] == ["ValueError: negative price"]
    assert found[0].text.startswith("Traceback (most recent call last):")
    assert found[0].text.endswith("ValueError: negative price")
    assert consumed == len(SIMPLE)


def test_a_chained_exception_is_one_error_named_by_its_last_exception():
    found, consumed = scan_tracebacks(CHAINED)
    assert [t.exception for t in found] == ["RuntimeError: cannot load the order"]
    assert "During handling" in found[0].text
    assert consumed == len(CHAINED)


def test_a_traceback_still_being_written_is_left_for_the_next_scan():
    partial = SIMPLE[: SIMPLE.index(b"ValueError: negative")]
    found, consumed = scan_tracebacks(partial)
    assert found == []
    assert consumed == SIMPLE.index(b"Traceback")
    # The next scan starts there and sees it whole, once.
    found, _ = scan_tracebacks(SIMPLE[consumed:])
    assert [t.exception for t in found] == ["ValueError: negative price"]


def test_an_unfinished_last_line_is_not_consumed():
    found, consumed = scan_tracebacks(b"line one\nline tw")
    assert found == []
    assert consumed == len(b"line one\n")


def test_two_tracebacks_and_non_utf8_bytes():
    data = SIMPLE + b"\xff\xfe garbage\n" + SIMPLE.replace(b"negative price", b"boom")
    found, consumed = scan_tracebacks(data)
    assert [t.exception for t in found] == ["ValueError: negative price", "ValueError: boom"]
    assert consumed == len(data)


def test_text_that_mentions_tracebacks_is_not_one():
    data = b"INFO grep 'Traceback (most recent call last):' in logs\nKeyError: nope\n"
    assert scan_tracebacks(data) == ([], len(data))


def test_empty_input():
    assert scan_tracebacks(b"") == ([], 0)


# --- reading a slot's output in steps (a log cursor kept between scans) --------------------


def read(target: LocalSupervisor, cursor: str | None, max_bytes: int = 4096):
    """One scan: the tracebacks found and the cursor to keep."""
    chunk = target.log_since("dev.a.0", cursor, max_bytes)
    found, consumed = scan_tracebacks(chunk.data)
    return [t.exception for t in found], chunk.cursor_after(consumed)


def test_a_traceback_split_across_scans_of_a_local_log_is_found_once(tmp_path):
    target = LocalSupervisor(tmp_path)
    log = tmp_path / "dev.a.0.log"
    half = SIMPLE.index(b"ValueError: negative")
    log.write_bytes(SIMPLE[:half])

    assert read(target, None) == ([], str(SIMPLE.index(b"Traceback")))
    with log.open("ab") as handle:
        handle.write(SIMPLE[half:])
    found, cursor = read(target, str(SIMPLE.index(b"Traceback")))
    assert (found, cursor) == (["ValueError: negative price"], str(len(SIMPLE)))
    assert read(target, cursor) == ([], cursor)


def test_a_local_log_is_read_in_bounded_steps_and_from_the_start_once_replaced(tmp_path):
    target = LocalSupervisor(tmp_path)
    log = tmp_path / "dev.a.0.log"
    log.write_bytes(b"one\ntwo\nthree\n")

    chunk = target.log_since("dev.a.0", None, 6)
    assert chunk.data == b"one\ntw"
    assert (chunk.cursor_after(0), chunk.cursor_after(5), chunk.cursor_after(6)) == ("0", "4", "6")
    assert target.log_since("dev.a.0", "4", 100).data == b"two\nthree\n"
    log.write_bytes(b"new\n")  # shorter than the cursor: a new log
    assert target.log_since("dev.a.0", "8", 100).data == b"new\n"
    assert target.log_since("dev.a.0", "2026-01-01T00:00:00.000000000Z", 100).data == b"new\n"


def test_an_unknown_slot_has_no_output_and_keeps_its_cursor(tmp_path):
    chunk = LocalSupervisor(tmp_path).log_since("dev.gone.0", "42", 100)
    assert (chunk.data, chunk.cursor_after(0)) == (b"", "42")


def test_a_chunk_resumes_after_its_last_mark_within_what_was_consumed():
    chunk = LogChunk(b"ab\ncd\n", "t0", ((3, "t1"), (6, "t2")))
    assert [chunk.cursor_after(n) for n in (0, 2, 3, 5, 6)] == ["t0", "t0", "t1", "t1", "t2"]
    assert LogChunk(b"", None).cursor_after(0) is None
