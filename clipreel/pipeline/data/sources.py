"""Video lists -> a manifest: the four list formats clipreel reads, and their checks.

Formats (detected from the source itself):
- a **folder per class**: `SOURCE/<class name>/<video files>` (searched recursively; video files directly
  in SOURCE are kept as unlabelled);
- a **plain CSV** whose header has `path` and optionally `label`, `label_name`, `split`, `video_id`,
  `start`, `end` (seconds: the segment of an untrimmed video to sample inside; other columns are
  ignored); a class may be given by name only, in `label_name`;
- a **Kinetics CSV**: header `label,youtube_id,time_start,time_end,split[,is_cc]`; the video file is
  `{youtube_id}_{time_start:06d}_{time_end:06d}.<ext>`, looked for under the root;
- a **"path label" list** (UCF101 / HMDB51 / SSv2 / mmaction style, whitespace separated, no header):
  `path`, `path label` or `path num_frames label` per line. Labels are taken as written: UCF101's
  1-based class numbers are not shifted.

Relative paths resolve against `root` if given, else the list file's folder. A video's id is its path
relative to that root without the extension (Kinetics: `youtube_id_start_end`; a plain CSV may name it
in a `video_id` column; a row with a segment gets `_START-END` appended). Lists and label maps are
UTF-8 text. Every problem the user can fix raises `ClipreelError` naming the file, the line and the fix.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from clipreel.errors import ClipreelError
from clipreel.stores.manifest import new_manifest, read_label_map

# file suffixes taken as videos, in the order Kinetics files are looked for
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg")
KINETICS_COLUMNS = ("youtube_id", "time_start", "time_end")
MAX_LISTED = 10  # problems listed one by one in an error message before "... and N more"
INT64_MAX = 2**63 - 1  # the manifest's integer columns are int64
LIST_FIX = "give a list file (CSV or 'path label') or a folder"
LABEL_MAP_FIX = "give a text file with one class name per line"


@dataclass
class _Row:
    """One video as a reader found it, before paths, labels and ids are settled."""

    where: str  # where it was read, for messages: "list.txt, line 7" or the video's path
    path: str  # as written in the list (relative or absolute), or the path a reader found
    label: int | None  # class id as written, None when the row gives none
    label_name: str  # class name as written, "" when the row gives none
    split: str
    video_id: str | None = None  # set by readers that name videos themselves (Kinetics)
    start: float | None = None  # seconds: the segment of the video to sample inside (plain CSV start,end)
    end: float | None = None


def read_sources(
    source: str | Path,
    *,
    root: Path | None = None,
    label_map: Path | None = None,
    skip_missing: bool = False,
    default_split: str = "all",
) -> pd.DataFrame:
    """Read a video list (or a folder per class) into a manifest whose rows are all `pending`.

    With `skip_missing`, files that do not exist stay in the manifest as `failed` rows
    (error `missing file: <path>`); without it, they are all reported in one error.
    """
    source = Path(source).expanduser()
    if label_map is not None:
        read_text(Path(label_map), "label map", LABEL_MAP_FIX)  # clear errors where read_label_map has none
    class_names = read_label_map(label_map) if label_map is not None else None
    names_from = f"the label map {label_map}"  # where class_names come from, for messages
    missing_hint = ""
    if source.is_dir():
        base = Path(os.path.abspath(source))
        rows, folder_classes = _read_folder_tree(base, default_split)
        if class_names is None:
            class_names, names_from = folder_classes, f"the class folders of {source}"
    elif source.is_file():
        if root is not None and not Path(root).is_dir():
            raise ClipreelError(f"--root {root} is not a folder; give the folder the paths in {source} are under")
        base = Path(os.path.abspath(Path(root).expanduser() if root is not None else source.parent))
        header = _first_row(source)
        if not header:
            raise ClipreelError(f"{source} lists no videos; add at least one row")
        if set(KINETICS_COLUMNS) <= set(header):
            rows = _read_kinetics(source, base, default_split)
            missing_hint = (
                "Kinetics videos are looked for as <youtube_id>_<start>_<end>.<ext> in ROOT/<label>/, "
                "ROOT/<split>/<label>/, ROOT/<split>/ and ROOT/. "
            )
        elif "path" in header:
            rows = _read_plain_csv(source, default_split)
        elif source.suffix.lower() == ".csv":
            raise ClipreelError(
                f"{source}, line 1: a CSV header must name the columns, e.g. 'path,label[,label_name][,split]' "
                f"or Kinetics' 'label,youtube_id,time_start,time_end,split'; got {','.join(header)!r}"
            )
        else:
            rows = _read_path_label_list(source, default_split)
    else:
        read_text(source, "video list", LIST_FIX)  # raises: the source is missing or not a regular file

    if not rows:
        if source.is_dir():
            raise ClipreelError(f"{source} holds no video files ({' '.join(VIDEO_EXTENSIONS)}) in class folders")
        raise ClipreelError(f"{source} lists no videos; add at least one row")
    _settle_labels(rows, class_names, names_from)
    records = _records(rows, base, source, skip_missing, missing_hint)
    return new_manifest(records)


# --- readers: each returns the rows in file order --------------------------------------------------------


def _read_folder_tree(folder: Path, default_split: str) -> tuple[list[_Row], list[str]]:
    """Videos under `folder/<class>/` (recursively), class by class in sorted order; also the class names."""
    class_dirs = sorted(child for child in folder.iterdir() if child.is_dir() and not child.name.startswith("."))
    rows = [
        _Row(where=str(video), path=str(video), label=None, label_name="", split=default_split)
        for video in _video_files(folder.iterdir())
    ]
    for class_dir in class_dirs:
        rows += [
            _Row(where=str(video), path=str(video), label=None, label_name=class_dir.name, split=default_split)
            for video in _video_files(class_dir.rglob("*"))
        ]
    return rows, [class_dir.name for class_dir in class_dirs]


def _video_files(paths) -> list[Path]:
    """The video files among `paths` (by suffix, hidden files skipped), sorted."""
    return sorted(
        path for path in paths
        if path.suffix.lower() in VIDEO_EXTENSIONS and not path.name.startswith(".") and path.is_file()
    )


def _read_plain_csv(path: Path, default_split: str) -> list[_Row]:
    """Rows of a CSV with a `path` column and optional `label`, `label_name`, `split`."""
    rows = []
    for where, values in _csv_records(path):
        if not values["path"]:
            raise ClipreelError(f"{where}: the path is empty; give the video's path or remove the line")
        rows.append(
            _Row(
                where=where,
                path=values["path"],
                label=_parse_label(values.get("label", ""), where),
                label_name=values.get("label_name", ""),
                split=values.get("split", "") or default_split,
                video_id=values.get("video_id", "") or None,
                start=_parse_seconds(values.get("start", ""), "start", where),
                end=_parse_seconds(values.get("end", ""), "end", where),
            )
        )
        if rows[-1].start is not None and rows[-1].end is not None and rows[-1].end <= rows[-1].start:
            raise ClipreelError(f"{where}: the segment ends ({rows[-1].end} s) before it starts ({rows[-1].start} s); "
                                "give end > start")
    return rows


def _parse_seconds(text: str, column: str, where: str) -> float | None:
    """A time in seconds (>= 0), or None for an empty cell."""
    if not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        raise ClipreelError(f"{where}: {column} {text!r} is not a number of seconds") from None
    if not value >= 0:
        raise ClipreelError(f"{where}: {column} {text!r} must be 0 or more seconds")
    return value


def _read_kinetics(path: Path, base: Path, default_split: str) -> list[_Row]:
    """Rows of a Kinetics CSV, each with the video file found under `base` (or where it should be)."""
    finder = _FolderIndex()
    rows = []
    for where, values in _csv_records(path):
        start = _parse_int(values["time_start"], "time_start", where)
        end = _parse_int(values["time_end"], "time_end", where)
        name = f"{values['youtube_id']}_{start:06d}_{end:06d}"
        label_name = values.get("label", "")
        split = values.get("split", "") or default_split
        folders = _kinetics_folders(base, label_name, split)
        found = finder.find(folders, name)
        rows.append(
            _Row(
                where=where,
                path=str(found or folders[0] / f"{name}{VIDEO_EXTENSIONS[0]}"),
                label=None,
                label_name=label_name,
                split=split,
                video_id=name,
            )
        )
    return rows


def _kinetics_folders(base: Path, label_name: str, split: str) -> list[Path]:
    """Where a Kinetics video may be: ROOT/<label>/, ROOT/<split>/<label>/, ROOT/<split>/, ROOT/.

    Downloaders write class folders either with spaces or with underscores; both are tried.
    """
    folders = []
    if label_name:
        label_dirs = dict.fromkeys([label_name, label_name.replace(" ", "_")])
        folders += [base / label_dir for label_dir in label_dirs]
        folders += [base / split / label_dir for label_dir in label_dirs]
    return [*folders, base / split, base]


class _FolderIndex:
    """Finds `<stem>.<video extension>` in folders, listing each folder once (Kinetics has ~10^5 rows)."""

    def __init__(self) -> None:
        self._listings: dict[Path, dict[str, str]] = {}

    def find(self, folders: list[Path], stem: str) -> Path | None:
        for folder in folders:
            file_name = self._listing(folder).get(stem)
            if file_name is not None:
                return folder / file_name
        return None

    def _listing(self, folder: Path) -> dict[str, str]:
        """stem -> file name of the videos in `folder` (the first extension of VIDEO_EXTENSIONS wins)."""
        if folder not in self._listings:
            by_stem: dict[str, str] = {}
            try:
                names = sorted(os.listdir(folder), key=_extension_rank)
            except (FileNotFoundError, NotADirectoryError):
                names = []
            for file_name in names:
                stem, extension = os.path.splitext(file_name)
                if extension.lower() in VIDEO_EXTENSIONS:
                    by_stem.setdefault(stem, file_name)
            self._listings[folder] = by_stem
        return self._listings[folder]


def _extension_rank(file_name: str) -> int:
    """Position of the file's extension in VIDEO_EXTENSIONS (non-videos last)."""
    extension = os.path.splitext(file_name)[1].lower()
    return VIDEO_EXTENSIONS.index(extension) if extension in VIDEO_EXTENSIONS else len(VIDEO_EXTENSIONS)


def _read_path_label_list(path: Path, default_split: str) -> list[_Row]:
    """Rows of a whitespace-separated list: `path`, `path label` or `path num_frames label` per line."""
    rows = []
    first_width = None
    for number, line in enumerate(read_text(path, "video list", LIST_FIX).splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}, line {number}"
        if first_width is None:
            first_width = len(fields)
        if len(fields) not in (1, 2, 3) or len(fields) != first_width:
            raise ClipreelError(
                f"{where}: {len(fields)} fields ({line.strip()!r}) but the first row has {first_width}; every line "
                "must be 'path', 'path label' or 'path num_frames label' (paths cannot contain spaces here: "
                "use a CSV with a path column for those)"
            )
        if len(fields) == 3:
            _parse_int(fields[1], "num_frames", where)  # checked, not kept: probing measures the real count
        label = _parse_label(fields[-1], where) if len(fields) > 1 else None
        rows.append(_Row(where=where, path=fields[0], label=label, label_name="", split=default_split))
    return rows


# --- small parsing helpers ------------------------------------------------------------------------------


def read_text(path: Path, what: str, fix: str) -> str:
    """The text of a UTF-8 file (a byte-order mark is dropped), with clear errors for a path that is
    missing or not a regular file and for bytes that are not UTF-8; `fix` says what to give instead."""
    kind = _file_kind(path)
    if kind == "missing":
        raise ClipreelError(f"{what} {path} does not exist; {fix}")
    if kind != "file":
        raise ClipreelError(f"{what} {path} is not a regular file ({kind}); {fix}")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ClipreelError(
            f"{path}, line {line}: byte 0x{data[exc.start]:02x} is not UTF-8 text; save the {what} as UTF-8 "
            "(for example: iconv -f latin1 -t utf-8 OLD > NEW)"
        ) from None


def _first_row(path: Path) -> list[str]:
    """The first non-blank line of a file, split as CSV, stripped and lower-cased (a header, if any)."""
    for line in read_text(path, "video list", LIST_FIX).splitlines():
        if line.strip():
            return [field.strip().lower() for field in next(csv.reader([line]))]
    return []


def _csv_records(path: Path):
    """Yield (where, {lower-cased column: stripped value}) for each data row of a CSV with a header."""
    with io.StringIO(read_text(path, "video list", LIST_FIX), newline="") as handle:
        reader = csv.reader(handle)
        header = None
        for fields in reader:
            if not any(field.strip() for field in fields):
                continue
            if header is None:
                header = [field.strip().lower() for field in fields]
                continue
            where = f"{path}, line {reader.line_num}"
            if len(fields) != len(header):
                raise ClipreelError(
                    f"{where}: {len(fields)} fields but the header has {len(header)} ({','.join(header)}); "
                    "fix the row (quote values that contain commas)"
                )
            yield where, {name: value.strip() for name, value in zip(header, fields)}


def _parse_label(text: str, where: str) -> int | None:
    """A class id as written: None if empty, else an integer >= -1 (-1 = unknown)."""
    if text == "":
        return None
    label = _parse_int(text, "label", where)
    if label < -1:
        raise ClipreelError(f"{where}: label {label} is negative; labels are class ids >= 0, or -1 for unknown")
    return label


def _parse_int(text: str, column: str, where: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise ClipreelError(f"{where}: {column} {text!r} is not an integer; fix the row") from None
    if abs(number) > INT64_MAX:
        raise ClipreelError(f"{where}: {column} {text} is too large (at most {INT64_MAX}); fix the row")
    return number


# --- labels, paths, ids ---------------------------------------------------------------------------------


def _settle_labels(rows: list[_Row], class_names: list[str] | None, names_from: str) -> None:
    """Give every row both a class id and a class name (or -1 and ""), checked against the class names."""
    if class_names is not None:
        _labels_from_map(rows, class_names, names_from)
    elif any(row.label is not None for row in rows):
        _labels_from_ids(rows)
    else:  # names only (or nothing): ids are the sorted unique names
        names = sorted({row.label_name for row in rows if row.label_name})
        _labels_from_map(rows, names, "the sorted class names of the list")


def _labels_from_map(rows: list[_Row], class_names: list[str], names_from: str) -> None:
    """Check ids and names against an ordered list of class names (from `names_from`), filling in the missing half."""
    label_of = {name: label for label, name in enumerate(class_names)}
    for row in rows:
        if row.label is not None and row.label >= 0:
            if row.label >= len(class_names):
                raise ClipreelError(
                    f"{row.where}: label {row.label} is out of range for {names_from} ({len(class_names)} classes, "
                    f"labels 0..{len(class_names) - 1}); labels are taken as written, so 1-based lists "
                    "(UCF101's classInd numbering) need 1 subtracted, or give class names instead"
                )
            if row.label_name and row.label_name != class_names[row.label]:
                raise ClipreelError(
                    f"{row.where}: label {row.label} is {class_names[row.label]!r} in {names_from} but the row names "
                    f"{row.label_name!r}; fix the label or the name"
                )
            row.label_name = class_names[row.label]
        elif row.label_name:
            if row.label_name not in label_of:
                raise ClipreelError(
                    f"{row.where}: unknown class name {row.label_name!r}, not in {names_from}; "
                    "fix the name or add the class to the label map"
                )
            row.label = label_of[row.label_name]
        else:
            row.label, row.label_name = -1, ""


def _labels_from_ids(rows: list[_Row]) -> None:
    """Without a label map: ids as written; names, where given, must agree with the ids across rows."""
    name_of: dict[int, tuple[str, str]] = {}  # label -> (name, where it was first given)
    label_of: dict[str, tuple[int, str]] = {}  # name -> (label, where it was first given)
    for row in rows:
        if row.label is None and row.label_name:
            raise ClipreelError(
                f"{row.where}: the row names class {row.label_name!r} but gives no label id while other rows do; "
                "give the id, or pass a label map (--labels) so that names can be turned into ids"
            )
        if row.label is None or row.label < 0 or not row.label_name:
            continue
        first_name, first_where = name_of.setdefault(row.label, (row.label_name, row.where))
        if first_name != row.label_name:
            raise ClipreelError(
                f"{row.where}: label {row.label} is named {row.label_name!r} but {first_name!r} at {first_where}; "
                "one id must have one name"
            )
        first_label, first_where = label_of.setdefault(row.label_name, (row.label, row.where))
        if first_label != row.label:
            raise ClipreelError(
                f"{row.where}: class {row.label_name!r} has label {row.label} but {first_label} at {first_where}; "
                "one name must have one id"
            )
    for row in rows:
        if row.label is None or row.label < 0:
            row.label, row.label_name = -1, ""
        elif not row.label_name:
            row.label_name = name_of.get(row.label, ("", ""))[0]


def _records(rows: list[_Row], base: Path, source: Path, skip_missing: bool, missing_hint: str) -> list[dict]:
    """Manifest records: absolute paths, unique ids; paths that are not video files refused, or
    recorded as failed (`skip_missing`)."""
    records = []
    first: dict[str, tuple[str, Path]] = {}  # video id -> (where, path) of its first row
    repeated, clashing = [], []
    missing, not_files = [], []
    for row in rows:
        path = Path(os.path.abspath(base / _expand_user(row)))
        video_id = row.video_id or _video_id(path, base) + _segment_suffix(row)
        if video_id in first:
            first_where, first_path = first[video_id]
            if first_path == path:
                repeated.append(f"{video_id!r} at {first_where} and {row.where}")
            elif first_where == str(first_path):  # rows of a folder tree are named by their paths
                clashing.append(f"{video_id!r}: {first_path} and {path}")
            else:
                clashing.append(f"{video_id!r} at {first_where} and {row.where} ({first_path.name}, {path.name})")
        first.setdefault(video_id, (row.where, path))
        record = {
            "video_id": video_id,
            "path": str(path),
            "label": row.label,
            "label_name": row.label_name,
            "split": row.split,
            "start": row.start,
            "end": row.end,
        }
        kind = _file_kind(path)
        if kind == "missing":
            missing.append(f"{row.where}: {path}")
            record.update(status="failed", error=f"missing file: {path}")
        elif kind != "file":
            not_files.append(f"{row.where}: {path} ({kind})")
            record.update(status="failed", error=f"not a regular file ({kind}): {path}")
        records.append(record)

    if repeated or clashing:
        fixes = []
        if repeated:
            fixes.append("remove the repeated lines")
        if clashing:
            fixes.append(
                "files whose paths differ only in the extension get the same id (the path without it): "
                "rename or remove one of each pair"
            )
        raise ClipreelError(
            f"{len(repeated) + len(clashing)} video id(s) of {source} are taken more than once:\n"
            f"{_listing(repeated + clashing)}\nEvery video needs an id of its own: {'; '.join(fixes)}."
        )
    if (missing or not_files) and not skip_missing:
        problems = []
        if not_files:
            problems.append(
                f"{len(not_files)} path(s) listed in {source} are not regular files:\n{_listing(not_files)}\n"
                "List the video files themselves (a folder with a subfolder per class is read with --videos FOLDER)."
            )
        if missing:
            problems.append(
                f"{len(missing)} video file(s) listed in {source} do not exist:\n{_listing(missing)}\n"
                f"{missing_hint}Relative paths resolve against {base}: if they are under another folder pass "
                "--root FOLDER."
            )
        raise ClipreelError("\n".join(problems) + "\nOr pass --skip-missing to record them as failed and go on.")
    return records


def _segment_suffix(row: _Row) -> str:
    """"_START-END" (seconds) for a row that samples one segment, so that segments of a file are videos of their own."""
    if row.start is None and row.end is None:
        return ""
    return f"_{row.start or 0:g}-{'end' if row.end is None else f'{row.end:g}'}"


def _expand_user(row: _Row) -> Path:
    """The row's path with a leading ~ or ~user expanded; clear errors for paths no file can have."""
    if "\x00" in row.path:
        raise ClipreelError(f"{row.where}: the path {row.path!r} holds a NUL character; fix the row")
    try:
        return Path(row.path).expanduser()
    except RuntimeError:
        user = row.path.split("/", 1)[0]
        raise ClipreelError(f"{row.where}: {user} in {row.path!r} names no user of this machine; write the path out") from None


def _file_kind(path: Path) -> str:
    """"file" for a regular file, "missing", or what else is there ("a directory", ...)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return "missing"
        return f"cannot be looked at: {exc.strerror}"
    if stat.S_ISREG(mode):
        return "file"
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _video_id(path: Path, base: Path) -> str:
    """The path relative to `base` without its extension (the absolute path when it is not under `base`)."""
    relative = Path(os.path.relpath(path, base))
    if relative.parts and relative.parts[0] == "..":
        relative = path
    return relative.with_suffix("").as_posix()


def _listing(problems: list[str]) -> str:
    """Up to MAX_LISTED problems, one per indented line, then how many more."""
    lines = [f"  {problem}" for problem in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
    return "\n".join(lines)
