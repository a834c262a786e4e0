"""Every bad video list is a clear error: `clipreel manifest` exits 2 with a message naming the
file and what is wrong, never a traceback. Real files in tmp_path, the real entry point."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_runs import run_in_this_process

from clipreel.pipeline.data.sources import read_sources

TOO_BIG = str(2**63)  # one past the largest int64


def write(folder: Path, name: str, content: str | bytes) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def touch(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).touch()


def given(folder: Path, files: tuple[str, ...], args: list) -> list[str]:
    """Create the (empty) `files` under `folder`; return `args` as strings."""
    touch(folder, *files)
    return [str(arg) for arg in args]


# Each case: (id, setup(folder) -> the arguments before OUT, what the message must say).
# "{folder}" in the expected text stands for the case's folder.
CASES = [
    ("not-utf8-csv", lambda d: [str(write(d, "list.csv", b"path,label\na.mp4,0\nb\xe9.mp4,1\n"))],
     "list.csv, line 3: byte 0xe9 is not UTF-8 text"),
    ("not-utf8-txt", lambda d: [str(write(d, "list.txt", b"a.mp4 0\n\xff.mp4 1\n"))],
     "list.txt, line 2: byte 0xff is not UTF-8 text"),
    ("not-utf8-label-map", lambda d: given(d, ("a.mp4",), [
        write(d, "list.csv", "path,label\na.mp4,0\n"), "--labels", write(d, "labels.txt", b"caf\xe9\n")]),
     "labels.txt, line 1: byte 0xe9 is not UTF-8 text; save the label map as UTF-8"),
    ("label-beyond-int64-csv", lambda d: [str(write(d, "list.csv", f"path,label\na.mp4,{TOO_BIG}\n"))],
     f"list.csv, line 2: label {TOO_BIG} is too large"),
    ("label-beyond-int64-txt", lambda d: [str(write(d, "list.txt", f"a.mp4 {TOO_BIG}\n"))],
     f"list.txt, line 1: label {TOO_BIG} is too large"),
    ("num-frames-beyond-int64", lambda d: [str(write(d, "list.txt", f"a.mp4 {TOO_BIG} 0\n"))],
     f"list.txt, line 1: num_frames {TOO_BIG} is too large"),
    ("directory-in-list", lambda d: given(d, ("clips.mp4/inside.mp4",), [write(d, "list.csv", "path,label\nclips.mp4,0\n")]),
     "{folder}/clips.mp4 (a directory)"),
    ("dev-zero-in-list", lambda d: [str(write(d, "list.csv", "path,label\n/dev/zero,0\n"))],
     "list.csv, line 2: /dev/zero (a character device)"),
    ("list-is-dev-zero", lambda d: ["/dev/zero"], "video list /dev/zero is not a regular file (a character device)"),
    ("list-is-missing", lambda d: [str(d / "nowhere.csv")], "video list {folder}/nowhere.csv does not exist"),
    ("label-map-is-a-directory", lambda d: given(d, ("a.mp4",), [write(d, "list.csv", "path,label\na.mp4,0\n"), "--labels", d]),
     "label map {folder} is not a regular file (a directory)"),
    ("nul-in-path", lambda d: [str(write(d, "list.txt", "a\x00.mp4 0\n"))], "list.txt, line 1: the path 'a\\x00.mp4' holds a NUL"),
    ("unknown-home", lambda d: [str(write(d, "list.csv", "path,label\n~no-such-user-here/a.mp4,0\n"))],
     "~no-such-user-here in '~no-such-user-here/a.mp4' names no user of this machine"),
    ("name-too-long", lambda d: [str(write(d, "list.csv", f"path,label\n{'x' * 300}.mp4,0\n"))],
     "(cannot be looked at: File name too long)"),
    ("same-stem-in-class-folder", lambda d: given(d, ("tree/run/a.mp4", "tree/run/a.avi", "tree/walk/b.mp4"), [d / "tree"]),
     "'run/a': {folder}/tree/run/a.avi and {folder}/tree/run/a.mp4"),
    ("same-stem-in-list", lambda d: given(d, ("a.mp4", "a.webm"), [write(d, "list.txt", "a.mp4 0\na.webm 1\n")]),
     "line 1 and {folder}/list.txt, line 2 (a.mp4, a.webm)"),
    ("repeated-line", lambda d: given(d, ("a.mp4",), [write(d, "list.txt", "a.mp4 0\na.mp4 0\n")]),
     "remove the repeated lines"),
    ("missing-file", lambda d: [str(write(d, "list.csv", "path,label\ngone.mp4,0\n"))],
     "list.csv, line 2: {folder}/gone.mp4"),
    ("empty-file", lambda d: [str(write(d, "list.csv", ""))], "list.csv lists no videos"),
    ("header-only", lambda d: [str(write(d, "list.csv", "path,label\n"))], "list.csv lists no videos"),
    ("no-header", lambda d: [str(write(d, "list.csv", "a.mp4,0\n"))], "list.csv, line 1: a CSV header must name the columns"),
    ("wrong-field-count", lambda d: [str(write(d, "list.csv", "path,label\na.mp4,0,extra\n"))],
     "list.csv, line 2: 3 fields but the header has 2"),
    ("label-not-a-number", lambda d: [str(write(d, "list.txt", "a.mp4 one\n"))], "list.txt, line 1: label 'one' is not an integer"),
    ("label-negative", lambda d: [str(write(d, "list.txt", "a.mp4 -4\n"))], "list.txt, line 1: label -4 is negative"),
    ("label-beyond-label-map", lambda d: given(d, ("a.mp4",), [
        write(d, "list.txt", "a.mp4 3\n"), "--labels", write(d, "labels.txt", "run\nwalk\n")]),
     "list.txt, line 1: label 3 is out of range"),
    ("kinetics-time-not-a-number", lambda d: [str(write(d, "k.csv", "label,youtube_id,time_start,time_end,split\nrun,abc,x,10,train\n"))],
     "k.csv, line 2: time_start 'x' is not an integer"),
    ("root-is-a-file", lambda d: [str(write(d, "list.csv", "path,label\na.mp4,0\n")), "--root", "/dev/zero"],
     "--root /dev/zero is not a folder"),
]


@pytest.mark.parametrize("setup, expected", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_list_exits_2_with_a_clear_message(tmp_path, capsys, setup, expected):
    args = setup(tmp_path)
    code = run_in_this_process("manifest", *args, tmp_path / "out.parquet")
    captured = capsys.readouterr()
    message = " ".join(captured.err.split())  # the console wraps long lines
    assert code == 2, captured
    assert "Traceback" not in captured.out + captured.err
    assert message.startswith("error:")
    assert expected.format(folder=tmp_path) in message
    assert not (tmp_path / "out.parquet").exists()


def test_skip_missing_records_what_is_not_a_regular_file_as_failed(tmp_path):
    touch(tmp_path, "a.mp4")
    (tmp_path / "clips.mp4").mkdir()
    listing = write(tmp_path, "list.csv", "path,label\na.mp4,0\nclips.mp4,1\n/dev/zero,1\ngone.mp4,0\n")
    table = read_sources(listing, skip_missing=True)
    assert table["status"].tolist() == ["pending", "failed", "failed", "failed"]
    assert table["error"].tolist() == [
        "",
        f"not a regular file (a directory): {tmp_path / 'clips.mp4'}",
        "not a regular file (a character device): /dev/zero",
        f"missing file: {tmp_path / 'gone.mp4'}",
    ]
