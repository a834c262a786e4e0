"""Video lists -> manifest: the four formats, label maps, and every error a user can hit.

Video files here are zero-byte placeholders: the readers only check that files exist.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from clipreel.errors import ClipreelError
from clipreel.pipeline.data.sources import read_sources
from clipreel.stores.manifest import MANIFEST_COLUMNS, write_label_map


def _touch(*paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def test_plain_csv_resolves_against_its_folder(tmp_path):
    _touch(tmp_path / "clips" / "a.mp4", tmp_path / "clips" / "b.webm", tmp_path / "c.avi")
    listing = tmp_path / "list.csv"
    listing.write_text(
        "path,label,label_name,split,notes\n"
        "clips/a.mp4,1,jump,train,first\n"
        "\n"
        "clips/b.webm,0,run,val,\n"
        f"{tmp_path / 'c.avi'},1,,test,absolute path\n"
    )
    table = read_sources(listing)
    assert list(table.columns) == list(MANIFEST_COLUMNS)
    assert table["video_id"].tolist() == ["clips/a", "clips/b", "c"]
    assert table["path"].tolist() == [str(tmp_path / "clips" / "a.mp4"), str(tmp_path / "clips" / "b.webm"),
                                      str(tmp_path / "c.avi")]
    assert table["label"].tolist() == [1, 0, 1]
    assert table["label_name"].tolist() == ["jump", "run", "jump"]  # the unnamed row takes its id's name
    assert table["split"].tolist() == ["train", "val", "test"]
    assert (table["status"] == "pending").all() and (table["num_frames"] == -1).all()


def test_plain_csv_with_names_only_and_a_root(tmp_path):
    data = tmp_path / "data"
    _touch(data / "x.mp4", data / "y.mp4", data / "z.mp4")
    listing = tmp_path / "lists" / "names.csv"
    listing.parent.mkdir()
    listing.write_text("path,label_name\nx.mp4,walk\ny.mp4,clap\nz.mp4,walk\n")
    table = read_sources(listing, root=data, default_split="test")
    assert table["label"].tolist() == [1, 0, 1]  # sorted unique names: clap=0, walk=1
    assert table["split"].tolist() == ["test"] * 3
    assert table["video_id"].tolist() == ["x", "y", "z"]

    label_map = write_label_map(["walk", "sit", "clap"], tmp_path / "labels.txt")
    table = read_sources(listing, root=data, label_map=label_map)
    assert table["label"].tolist() == [0, 2, 0]


def test_plain_csv_may_name_its_videos(tmp_path):
    _touch(tmp_path / "a.mp4", tmp_path / "b.mp4")
    listing = tmp_path / "list.csv"
    listing.write_text(f"path,label,video_id\n{tmp_path / 'a.mp4'},0,clips/first\nb.mp4,1,\n")
    assert read_sources(listing)["video_id"].tolist() == ["clips/first", "b"]  # an empty id: from the path
    listing.write_text("path,label,video_id\na.mp4,0,same\nb.mp4,1,same\n")
    with pytest.raises(ClipreelError, match="same"):
        read_sources(listing)  # ids must stay unique


def test_path_label_lists_take_labels_as_written(tmp_path):
    _touch(tmp_path / "ApplyEyeMakeup" / "v_1.avi", tmp_path / "Archery" / "v_2.avi")
    train = tmp_path / "trainlist01.txt"
    train.write_text("ApplyEyeMakeup/v_1.avi 1\nArchery/v_2.avi   2\n\n")
    table = read_sources(train)
    assert table["label"].tolist() == [1, 2]  # 1-based class numbers are not shifted
    assert table["video_id"].tolist() == ["ApplyEyeMakeup/v_1", "Archery/v_2"]
    assert table["label_name"].tolist() == ["", ""]

    test = tmp_path / "testlist01.txt"
    test.write_text("ApplyEyeMakeup/v_1.avi\nArchery/v_2.avi\n")
    assert read_sources(test)["label"].tolist() == [-1, -1]

    with_counts = tmp_path / "frames.lst"
    with_counts.write_text("ApplyEyeMakeup/v_1.avi 120 0\nArchery/v_2.avi 95 1\n")
    label_map = write_label_map(["ApplyEyeMakeup", "Archery"], tmp_path / "classes.txt")
    table = read_sources(with_counts, label_map=label_map)
    assert table["label"].tolist() == [0, 1]
    assert table["label_name"].tolist() == ["ApplyEyeMakeup", "Archery"]


def test_kinetics_csv_finds_files_in_the_usual_layouts(tmp_path):
    root = tmp_path / "k400"
    _touch(
        root / "abseiling" / "aaa_000010_000020.mp4",  # ROOT/<label>/
        root / "val" / "air_drumming" / "bbb_000000_000010.webm",  # ROOT/<split>/<label with underscores>/
        root / "ccc_000005_000015.mkv",  # ROOT/
    )
    listing = tmp_path / "val.csv"
    listing.write_text(
        "label,youtube_id,time_start,time_end,split,is_cc\n"
        "abseiling,aaa,10,20,train,0\n"
        "air drumming,bbb,0,10,val,0\n"
        '"massaging person\'s head",ccc,5,15,val,1\n'
    )
    table = read_sources(listing, root=root)
    assert table["video_id"].tolist() == ["aaa_000010_000020", "bbb_000000_000010", "ccc_000005_000015"]
    assert table["path"].tolist() == [
        str(root / "abseiling" / "aaa_000010_000020.mp4"),
        str(root / "val" / "air_drumming" / "bbb_000000_000010.webm"),
        str(root / "ccc_000005_000015.mkv"),
    ]
    assert table["label"].tolist() == [0, 1, 2]
    assert table["label_name"].tolist() == ["abseiling", "air drumming", "massaging person's head"]
    assert table["split"].tolist() == ["train", "val", "val"]

    label_map = write_label_map(["massaging person's head", "air drumming", "abseiling"], tmp_path / "k.txt")
    assert read_sources(listing, root=root, label_map=label_map)["label"].tolist() == [2, 1, 0]


def test_folder_per_class_tree(tmp_path):
    tree = tmp_path / "tree"
    _touch(
        tree / "walk" / "w1.mp4",
        tree / "walk" / "more" / "w2.MKV",
        tree / "run" / "r1.avi",
        tree / "run" / "notes.txt",  # not a video: ignored
        tree / "run" / ".hidden.mp4",
        tree / "loose.mp4",  # no class folder: unlabelled
    )
    (tree / "empty_class").mkdir()
    table = read_sources(tree)
    assert table["video_id"].tolist() == ["loose", "run/r1", "walk/more/w2", "walk/w1"]
    assert table["label"].tolist() == [-1, 1, 2, 2]  # labels = sorted class folders: empty_class, run, walk
    assert table["label_name"].tolist() == ["", "run", "walk", "walk"]
    assert (table["split"] == "all").all()

    label_map = write_label_map(["walk", "run"], tmp_path / "labels.txt")
    assert read_sources(tree, label_map=label_map)["label"].tolist() == [-1, 1, 0, 0]


def test_missing_files_are_all_reported_in_one_error(tmp_path):
    _touch(tmp_path / "here.mp4")
    listing = tmp_path / "list.txt"
    listing.write_text("here.mp4 0\n" + "".join(f"gone{i}.mp4 0\n" for i in range(12)))
    with pytest.raises(ClipreelError) as error:
        read_sources(listing)
    message = str(error.value)
    assert "12 video file(s)" in message
    assert f"{listing}, line 2: {tmp_path / 'gone0.mp4'}" in message
    assert "line 11" in message and "line 12" not in message and "and 2 more" in message
    assert "--root" in message and "--skip-missing" in message


def test_skip_missing_records_missing_files_as_failed(tmp_path):
    _touch(tmp_path / "here.mp4")
    listing = tmp_path / "list.csv"
    listing.write_text("path,label\nhere.mp4,0\ngone.mp4,1\n")
    table = read_sources(listing, skip_missing=True)
    assert table["status"].tolist() == ["pending", "failed"]
    assert table["error"].tolist() == ["", f"missing file: {tmp_path / 'gone.mp4'}"]
    assert table["label"].tolist() == [0, 1]


def test_missing_kinetics_files_say_where_they_were_looked_for(tmp_path):
    listing = tmp_path / "k.csv"
    listing.write_text("label,youtube_id,time_start,time_end,split\nabseiling,zzz,1,11,train\n")
    with pytest.raises(ClipreelError, match=r"(?s)k.csv, line 2: .*abseiling.*zzz_000001_000011.*ROOT/<label>/"):
        read_sources(listing)


def test_duplicate_videos_name_both_lines(tmp_path):
    _touch(tmp_path / "a.mp4", tmp_path / "a.webm")
    listing = tmp_path / "list.txt"
    listing.write_text("a.mp4 0\na.webm 1\n")  # same id "a"
    where = re.escape(str(listing))
    with pytest.raises(ClipreelError, match=rf"'a' at {where}, line 1 and {where}, line 2"):
        read_sources(listing)


def test_labels_are_checked_against_the_label_map(tmp_path):
    _touch(tmp_path / "a.mp4", tmp_path / "b.mp4")
    label_map = write_label_map(["run", "jump"], tmp_path / "labels.txt")
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("path,label_name\na.mp4,run\nb.mp4,swim\n")
    expected = rf"{re.escape(str(unknown))}, line 3: unknown class name 'swim'.*{re.escape(str(label_map))}"
    with pytest.raises(ClipreelError, match=expected):
        read_sources(unknown, label_map=label_map)
    out_of_range = tmp_path / "ucf.txt"
    out_of_range.write_text("a.mp4 1\nb.mp4 2\n")
    expected = rf"{re.escape(str(out_of_range))}, line 2: label 2 is out of range.*subtracted"
    with pytest.raises(ClipreelError, match=expected):
        read_sources(out_of_range, label_map=label_map)
    disagree = tmp_path / "disagree.csv"
    disagree.write_text("path,label,label_name\na.mp4,0,jump\n")
    with pytest.raises(ClipreelError, match=r"line 2: label 0 is 'run' in the label map"):
        read_sources(disagree, label_map=label_map)
    folder = tmp_path / "tree"
    _touch(folder / "swim" / "c.mp4")
    with pytest.raises(ClipreelError, match="unknown class name 'swim'"):
        read_sources(folder, label_map=label_map)


def test_names_and_ids_must_agree_without_a_map(tmp_path):
    _touch(tmp_path / "a.mp4", tmp_path / "b.mp4")
    listing = tmp_path / "list.csv"
    listing.write_text("path,label,label_name\na.mp4,0,run\nb.mp4,1,run\n")
    expected = rf"{re.escape(str(listing))}, line 3: class 'run' has label 1 but 0 at .*line 2"
    with pytest.raises(ClipreelError, match=expected):
        read_sources(listing)
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("path,label,label_name\na.mp4,0,run\nb.mp4,,jump\n")
    with pytest.raises(ClipreelError, match=r"line 3: the row names class 'jump' but gives no label id.*--labels"):
        read_sources(mixed)


def test_malformed_rows_name_file_and_line(tmp_path):
    _touch(tmp_path / "a.mp4", tmp_path / "b.mp4")
    widths = tmp_path / "widths.txt"
    widths.write_text("a.mp4 0\nb.mp4 0 extra words\n")
    with pytest.raises(ClipreelError, match=rf"{re.escape(str(widths))}, line 2: 4 fields"):
        read_sources(widths)
    not_int = tmp_path / "not_int.csv"
    not_int.write_text("path,label\na.mp4,0\n\nb.mp4,zero\n")
    with pytest.raises(ClipreelError, match=rf"{re.escape(str(not_int))}, line 4: label 'zero' is not an integer"):
        read_sources(not_int)
    columns = tmp_path / "columns.csv"
    columns.write_text("path,label\na.mp4,0,train\n")
    with pytest.raises(ClipreelError, match=rf"{re.escape(str(columns))}, line 2: 3 fields but the header has 2"):
        read_sources(columns)
    header = tmp_path / "header.csv"
    header.write_text("a.mp4,0\n")
    with pytest.raises(ClipreelError, match=rf"{re.escape(str(header))}, line 1: a CSV header must name the columns"):
        read_sources(header)


def test_empty_lists_and_missing_sources(tmp_path):
    header_only = tmp_path / "header_only.csv"
    header_only.write_text("path,label\n")
    with pytest.raises(ClipreelError, match=rf"{re.escape(str(header_only))} lists no videos"):
        read_sources(header_only)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n")
    with pytest.raises(ClipreelError, match="lists no videos"):
        read_sources(blank)
    folder = tmp_path / "empty_tree"
    (folder / "some_class").mkdir(parents=True)
    with pytest.raises(ClipreelError, match="holds no video files"):
        read_sources(folder)
    with pytest.raises(ClipreelError, match="does not exist"):
        read_sources(tmp_path / "no_such_list.csv")
