"""Class lists as users hand them over: what `import --classes` and `predict --classes` read.

A class list is the class names in class order (label i = name i), and, where the file gives
them, one description per class (the text a text-matching model scores the class against):

- a text file, one class name per line (blank lines ignored), as `clipreel train --classes`;
- a JSON list of names;
- a CSV with a header: the class names are the column `name` (X-CLIP's and ViFi-CLIP's
  `labels/*.csv`: `id,name`) or `Class Name` (EZ-CLIP's `GPT_discription/*.csv`: `SNo,Class
  Name,GPT3 discription`), in file order; a column whose header starts with "description" or
  "GPT3" holds each class's description;
- on the command line (`predict --classes "a,b,c"`), names separated by commas.

Names are kept as they are written (underscores included): how a name becomes text is the model's
business (`readable_classname`, ViFi-CLIP's verbatim names).

May import: clipreel.errors.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from clipreel.errors import ClipreelError

NAME_COLUMNS = ("name", "class name", "classname", "class", "label", "label_name")
DESCRIPTION_PREFIXES = ("description", "discription", "gpt3", "gpt-3", "text")


@dataclass
class ClassList:
    """Class names in class order, and the descriptions of those that have one (name -> text)."""

    names: list[str]
    descriptions: dict[str, str] = field(default_factory=dict)
    source: str = ""


def read_class_list(spec: str | Path) -> ClassList:
    """A class list from a file (text, JSON list, CSV with a header), or from "a,b,c" when `spec`
    names no file. Refuses empty lists, empty names and duplicates, naming the line."""
    path = Path(spec).expanduser()
    if path.is_file():
        return _checked(_read_file(path), str(path))
    text = str(spec)
    if "," not in text and (path.suffix or "/" in text):
        raise ClipreelError(f"--classes {text}: no such file; give a class list file or names separated by commas ('a,b,c')")
    names = [part.strip() for part in text.split(",")]
    return _checked(ClassList(names=names, source="--classes"), "--classes")


def _read_file(path: Path) -> ClassList:
    """A class list file: a JSON list, a CSV with a header, or one name per line."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ClipreelError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); save the class list as UTF-8") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as error:
            raise ClipreelError(f"{path}: not a valid JSON list (line {error.lineno}, column {error.colno}: {error.msg})") from None
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise ClipreelError(f"{path}: a JSON class list is a list of strings, e.g. [\"archery\", \"bowling\"]")
        return ClassList(names=[name.strip() for name in names], source=str(path))
    if stripped.startswith("{"):
        raise ClipreelError(f"{path}: a JSON object; a JSON class list is a list of names in class order, "
                            "e.g. [\"archery\", \"bowling\"]")
    if path.suffix.lower() == ".csv":
        return _read_csv(path, text)
    names = [line.strip() for line in text.splitlines() if line.strip()]
    return ClassList(names=names, source=str(path))


def _read_csv(path: Path, text: str) -> ClassList:
    """A CSV class list: the name column, and a description column where there is one."""
    rows = list(csv.reader(text.splitlines(keepends=True)))
    if not rows:
        return ClassList(names=[], source=str(path))
    header = [cell.strip().lower() for cell in rows[0]]
    name_column = next((header.index(name) for name in NAME_COLUMNS if name in header), None)
    if name_column is None:
        raise ClipreelError(
            f"{path}: a CSV class list needs a header naming its class-name column ({', '.join(NAME_COLUMNS)}); "
            f"its header is {rows[0]}. Or give one class name per line in a .txt file."
        )
    description_column = next(
        (index for index, cell in enumerate(header) if cell.startswith(DESCRIPTION_PREFIXES)), None
    )
    names, descriptions = [], {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(name_column, description_column or 0):
            raise ClipreelError(f"{path}, line {line}: {len(row)} columns, but the header has {len(header)}")
        name = row[name_column].strip()
        names.append(name)
        if description_column is not None and row[description_column].strip():
            descriptions[name] = " ".join(row[description_column].split())
    return ClassList(names=names, descriptions=descriptions, source=str(path))


def _checked(classes: ClassList, where: str) -> ClassList:
    """The class list, refused if it is empty or a name is empty or repeated."""
    if not classes.names:
        raise ClipreelError(f"{where}: no class names; give one name per line, a JSON list, or a CSV with a name column")
    for index, name in enumerate(classes.names):
        if not name:
            raise ClipreelError(f"{where}: class {index} has an empty name")
    seen: dict[str, int] = {}
    for index, name in enumerate(classes.names):
        if name in seen:
            raise ClipreelError(f"{where}: the class name {name!r} appears twice (classes {seen[name]} and {index}); names must be unique")
        seen[name] = index
    return classes
