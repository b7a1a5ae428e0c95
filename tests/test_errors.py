"""The one mapping from exceptions to user messages: every errno the issue names, project errors, bugs."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from mics.config import ConfigError
from mics.errors import naming, os_error_message, user_message

RUN = "/data/runs/x/pretrain/encoders.safetensors"


def _err(code: int, filename: str | None = RUN) -> OSError:
    return OSError(code, os.strerror(code), filename) if filename is not None else OSError(code, "x")


@pytest.mark.parametrize(
    ("code", "remedy"),
    [
        (errno.EACCES, "give this user access"),
        (errno.EPERM, "give this user access"),
        (errno.EROFS, "read-only file system"),
        (errno.ENOTDIR, "regular file, not a folder"),
        (errno.EISDIR, "is a folder where a file was expected"),
        (errno.EEXIST, "choose another path"),
        (errno.ENOENT, "does not exist"),
        (errno.ENOSPC, "free some space"),
        (errno.EDQUOT, "free some space"),
        (errno.EMFILE, "ulimit -n"),
        (errno.ENFILE, "ulimit -n"),
        (errno.EIO, "check the disk"),
        (errno.ENAMETOOLONG, "shorter path"),
        (errno.ELOOP, "check the path"),  # any other errno: the system's words and the path
    ],
)
def test_each_errno_names_the_path_and_a_remedy(code, remedy):
    message = user_message(_err(code))
    assert message is not None and RUN in message and remedy in message
    assert "Traceback" not in message and "\n" not in message


def test_interrupted_work_says_how_to_resume():
    for code in (errno.ENOSPC, errno.EMFILE):
        message = os_error_message(_err(code), retry="rerun the same command with --resume")
        assert message is not None and "--resume" in message and "finished work is kept" in message


def test_subclasses_raised_by_python_are_mapped_too():
    message = user_message(PermissionError(errno.EACCES, "Permission denied", "/ro/run.json"))
    assert message is not None and "/ro/run.json" in message and "permission denied" in message
    message = user_message(OSError(errno.EXDEV, "cross-device link", "/a/.x.tmp", None, "/b/x"))
    assert message is not None and "/a/.x.tmp -> /b/x" in message


def test_an_error_without_a_path_says_how_to_find_it():
    message = user_message(_err(errno.ENOSPC, filename=None))
    assert message is not None and "free some space" in message and "a disk mics writes to" in message
    message = user_message(_err(errno.EACCES, filename=None))
    assert message is not None and "--debug" in message


def test_oserror_not_from_the_system_is_a_bug():
    # PIL's UnidentifiedImageError and friends are OSErrors without an errno: inputs are checked before
    # use, so one reaching the command line is a bug and keeps its traceback
    assert user_message(OSError("cannot identify image file")) is None


def test_project_errors_pass_their_message_and_bugs_get_none():
    assert user_message(ConfigError("bad key x.y; known keys: ...")) == "bad key x.y; known keys: ..."
    assert user_message(ValueError("a bug")) is None
    assert user_message(KeyError("k")) is None


def test_project_errors_are_recognised_once_their_module_is_loaded():
    from mics.data.errors import DataError

    message = "image a.jpg is truncated; remove it"
    assert user_message(DataError(message)) == message


def test_naming_puts_the_target_path_on_an_unnamed_or_temporary_error(tmp_path):
    target = tmp_path / "metrics.json"
    with pytest.raises(OSError) as info, naming(target):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.filename == str(target) and str(target) in str(info.value)
    with pytest.raises(OSError) as info, naming(target):
        raise OSError(errno.ENOSPC, "No space left", str(tmp_path / ".metrics.json.k2j3.tmp"))
    assert info.value.filename == str(target)
    with pytest.raises(OSError) as info, naming(target):
        raise OSError(errno.EXDEV, "cross-device", str(tmp_path / ".metrics.json.k2.tmp"), None, str(target))
    assert info.value.filename == str(target) and info.value.filename2 is None


def test_naming_keeps_a_real_path(tmp_path):
    other = tmp_path / "file" / "sub"
    with pytest.raises(NotADirectoryError) as info, naming(tmp_path / "target"):
        (tmp_path / "file").write_text("x")
        Path(other).mkdir(parents=True)
    assert Path(info.value.filename) == other
