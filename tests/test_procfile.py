"""Procfile parsing and process-type expansion (gateway.core.procfile)."""

import pytest

from gateway.core.procfile import ProcfileError, parse_procfile, resolve_command


def test_parse_types_commands_comments_and_blank_lines() -> None:
    text = (
        "# the app's processes\n"
        "\n"
        "web: gunicorn app:wsgi --bind 0.0.0.0:$PORT\r\n"
        "   \n"
        "  # indented comment\n"
        "worker:python work.py\n"
        "release-1_b:   ./migrate   --all  \n"
    )
    assert parse_procfile(text) == {
        "web": "gunicorn app:wsgi --bind 0.0.0.0:$PORT",
        "worker": "python work.py",
        "release-1_b": "./migrate   --all",
    }


def test_parse_empty_and_bom() -> None:
    assert parse_procfile("") == {}
    assert parse_procfile("\ufeffweb: serve\n") == {"web": "serve"}


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("web serve\n", 1),
        ("web: ok\n\nbad type: x\n", 3),
        ("web.1: serve\n", 1),
        ("web:\n", 1),
        ("web:    \n", 1),
        (": serve\n", 1),
        ("web : serve\n", 1),
        ("# c\nweb: a\nweb: b\n", 3),
    ],
)
def test_malformed_line_names_its_number(text: str, line: int) -> None:
    with pytest.raises(ProcfileError, match=rf"^line {line}: "):
        parse_procfile(text)


def test_procfile_error_is_a_value_error() -> None:
    assert issubclass(ProcfileError, ValueError)


def test_duplicate_type_names_both_lines() -> None:
    with pytest.raises(ProcfileError) as info:
        parse_procfile("web: a\nworker: w\nweb: b\n")
    assert str(info.value) == "line 3: process type 'web' is already defined on line 1"


PROCS = {"worker": "python work.py", "web": "gunicorn app"}


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("worker 42", "python work.py 42"),
        ("worker", "python work.py"),
        ("worker   ", "python work.py"),
        ("  worker 42", "python work.py 42"),
        ("worker  'a  b'  \"c\" ", "python work.py 'a  b'  \"c\" "),
        ("worker\t--once", "python work.py --once"),
        ("bash", "bash"),
        ("workers 1", "workers 1"),
        ("python worker", "python worker"),
        ("", ""),
        ("   ", "   "),
    ],
)
def test_resolve_command(command: str, expected: str) -> None:
    assert resolve_command(command, PROCS) == expected


def test_resolve_is_textual_not_shell_aware() -> None:
    # Like Heroku: only the first whitespace-separated word is looked up.
    assert resolve_command("worker;rm x", PROCS) == "worker;rm x"
    assert resolve_command("worker && echo done", PROCS) == "python work.py && echo done"
