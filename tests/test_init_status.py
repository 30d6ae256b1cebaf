"""The status lines a dyno's init writes (gateway/manager/dyno_init.py InitControl.said),
read from a real pipe as the manager reads them."""

from __future__ import annotations

import os

import pytest
import trio

from gateway.manager.dyno_init import InitControl, InitError


def said(written: bytes, *kinds: str, close: bool = True) -> list[str]:
    """What `said(kind)` returns for each of `kinds`, in turn, after the init's side of
    the pipe wrote `written` (and ended, with `close`)."""
    init = InitControl.open()
    try:
        os.write(init.child_status, written)
        if close:
            init.close_child_ends()

        async def main() -> list[str]:
            return [await init.said(kind) for kind in kinds]

        return trio.run(main)
    finally:
        init.close()


def test_pid_and_ready_are_read_in_either_order() -> None:
    # In sandbox mode the first process says "pid" and PID 1 says "ready": on a loaded
    # host PID 1 can say its line first.
    assert said(b"pid 42\nready\n", "pid", "ready") == ["42", ""]
    assert said(b"ready\npid 42\n", "pid", "ready") == ["42", ""]


def test_the_exit_status_is_kept_for_the_end() -> None:
    init = InitControl.open()
    try:
        os.write(init.child_status, b"ready\nexit 768\npid 7\n")
        init.close_child_ends()
        assert trio.run(init.said, "pid") == "7"
        assert init.main_status() == 768
    finally:
        init.close()


def test_an_error_or_an_early_end_is_an_init_error() -> None:
    with pytest.raises(InitError, match="mount: no such file"):
        said(b"error mount: no such file\n", "pid")
    with pytest.raises(InitError, match="mount failed"):
        said(b"pid 42\nerror mount failed\n", "pid", "ready")
    with pytest.raises(InitError, match="ended before it said 'ready'"):
        said(b"pid 42\n", "pid", "ready")
