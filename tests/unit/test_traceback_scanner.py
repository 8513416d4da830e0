"""The traceback scanner of the monitor, on log text as Python services write it."""

from cicd_dagster.deploy.monitor import scan_tracebacks

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
