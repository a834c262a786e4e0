"""Class lists as users hand them over (lines, JSON lists, label CSVs, EZ-CLIP's description CSVs, "a,b,c"),
and video lists whose rows name a segment (start,end columns)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from clipreel.errors import ClipreelError
from clipreel.pipeline.data.class_lists import read_class_list


def test_one_name_per_line_and_a_json_list_keep_names_verbatim(tmp_path):
    lines = tmp_path / "labels.txt"
    lines.write_text("abseiling\n\nplaying_guitar\n  air drumming  \n")
    assert read_class_list(lines).names == ["abseiling", "playing_guitar", "air drumming"]
    listed = tmp_path / "k400_class_mappings.json"  # EVL's data/k400_class_mappings.json is a JSON list
    listed.write_text(json.dumps(["abseiling", "air drumming"], indent=2))
    assert read_class_list(listed).names == ["abseiling", "air drumming"]


def test_label_csv_and_description_csv(tmp_path):
    labels = tmp_path / "hmdb_51_labels.csv"  # X-CLIP / ViFi-CLIP labels/*.csv
    labels.write_text("id,name\n0,brush hair\n1,cartwheel\n")
    assert read_class_list(labels).names == ["brush hair", "cartwheel"]
    assert read_class_list(labels).descriptions == {}
    described = tmp_path / "UCF_101_gpt_Class_discription_new.csv"  # EZ-CLIP's GPT_discription/*.csv
    with open(described, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["SNo", "Class Name", "GPT3 discription"])
        writer.writerow([1, "ApplyEyeMakeup", "\n\nApplyEyeMakeup is an action performed by humans."])
        writer.writerow([2, "Archery", "\n\nArchery is an action,\nwith a bow."])
    classes = read_class_list(described)
    assert classes.names == ["ApplyEyeMakeup", "Archery"]
    assert classes.descriptions == {"ApplyEyeMakeup": "ApplyEyeMakeup is an action performed by humans.",
                                    "Archery": "Archery is an action, with a bow."}


def test_names_on_the_command_line_and_refusals(tmp_path):
    assert read_class_list("cooking, walking the dog").names == ["cooking", "walking the dog"]
    with pytest.raises(ClipreelError, match="appears twice"):
        read_class_list("a,b,a")
    with pytest.raises(ClipreelError, match="class 1 has an empty name"):
        read_class_list("a,,b")
    with pytest.raises(ClipreelError, match="no such file"):
        read_class_list(str(tmp_path / "labels.txt"))
    header = tmp_path / "bad.csv"
    header.write_text("index,word\n0,a\n")
    with pytest.raises(ClipreelError, match="needs a header naming its class-name column"):
        read_class_list(header)
    mapping = tmp_path / "mapping.json"
    mapping.write_text('{"archery": 0, "bowling": 1}')
    with pytest.raises(ClipreelError, match="a JSON object; a JSON class list is a list of names"):
        read_class_list(mapping)


def test_a_plain_csv_with_start_end_columns_names_each_segment(tmp_path):
    from clipreel.pipeline.data.sources import read_sources
    from clipreel.stores.manifest import manifest_from_parquet, manifest_to_parquet

    (tmp_path / "talk.mp4").write_bytes(b"")
    listing = tmp_path / "list.csv"
    listing.write_text("path,label_name,start,end\ntalk.mp4,a,62,70\ntalk.mp4,b,,12.5\ntalk.mp4,a,,\n")
    manifest = read_sources(listing)
    assert list(manifest["video_id"]) == ["talk_62-70", "talk_0-12.5", "talk"]
    assert manifest["start"].tolist()[:1] == [62.0] and np.isnan(manifest["start"].iloc[1])
    assert manifest["end"].tolist()[:2] == [70.0, 12.5] and np.isnan(manifest["end"].iloc[2])
    older = manifest.drop(columns=["start", "end"])  # a manifest written before segments existed
    restored = manifest_from_parquet(manifest_to_parquet(older), "old.parquet")
    assert restored["start"].isna().all() and list(restored.columns) == list(manifest.columns)
    listing.write_text("path,start,end\ntalk.mp4,5,3\n")
    with pytest.raises(ClipreelError, match="line 2: the segment ends"):
        read_sources(listing)
