"""Reading and writing bitalloc's files safely: canonical JSON (sorted keys, 2-space indent) or YAML, written
atomically; YAML read as plain data with duplicate keys, alias bombs and deep nesting refused; text files
bounded in size and UTF-8 only. What the documents hold is `bitalloc.results`."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import yaml

from .errors import BitallocError, first_line

MAX_FILE_BYTES = 64 << 20  # a spec, config or front is kilobytes; anything this large is not one
MAX_NODES = 100_000  # values in a YAML document once its aliases are expanded
MAX_DEPTH = 64


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that also refuses duplicate keys (the second would silently win)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a plain value",
                                                        key_node.start_mark) from None
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep)


def _check_size(node, field: str) -> None:
    """Refuse documents whose aliases expand to more than MAX_NODES values or that nest deeper than MAX_DEPTH
    (a 'billion laughs' document is tiny on disk and enormous once read)."""
    count, stack = 0, [(node, 0)]
    while stack:
        current, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise BitallocError(field, f"the YAML expands to more than {MAX_NODES} values (through aliases?)")
        if depth > MAX_DEPTH:
            raise BitallocError(field, f"the YAML nests deeper than {MAX_DEPTH} levels")
        if isinstance(current, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in current.value)
        elif isinstance(current, yaml.MappingNode):
            stack.extend((child, depth + 1) for pair in current.value for child in pair)


def parse_yaml(text: str, field: str):
    """YAML text as plain data (safe types only), every failure one `BitallocError` naming `field`."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node, field)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise BitallocError(field, f"malformed YAML{where}: {first_line(getattr(exc, 'problem', None) or exc)}"
                            ) from None
    except RecursionError:
        raise BitallocError(field, f"the YAML nests deeper than {MAX_DEPTH} levels") from None
    finally:
        loader.dispose()


def read_text(path: Path, field: str) -> str:
    """A UTF-8 text file of reasonable size, or one `BitallocError` naming `field`: a device or pipe (whose size
    says nothing) is refused, and no more than MAX_FILE_BYTES are ever read."""
    try:
        if path.exists() and not path.is_file():
            raise BitallocError(field, f"{str(path)!r} is not a regular file")
        with open(path, "rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise BitallocError(field, f"{str(path)!r} is over {MAX_FILE_BYTES} bytes, too large for this file")
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BitallocError(field, f"{str(path)!r} is not UTF-8 text") from None
    except OSError as exc:
        raise BitallocError(field, f"{str(path)!r} cannot be read ({exc.strerror or exc})") from None


def dumps(doc: dict, suffix: str = ".json") -> str:
    if suffix in (".yaml", ".yml"):
        return yaml.safe_dump(doc, sort_keys=True)
    return json.dumps(doc, sort_keys=True, indent=2) + "\n"


def check_writable(path: Path, field: str) -> None:
    """Refuse, before any work, a path that cannot be created: its nearest existing ancestor must be a directory
    this process can create entries in (tried with a temporary entry, removed at once)."""
    ancestor = Path(os.path.abspath(path)).parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise BitallocError(field, f"cannot create {str(path)!r}: {str(ancestor)!r} is a file, not a directory")
    try:
        tempfile.TemporaryDirectory(dir=ancestor, prefix=".bitalloc-probe-").cleanup()
    except OSError as exc:
        raise BitallocError(field, f"cannot create {str(path)!r}: {str(ancestor)!r} is not writable "
                                   f"({exc.strerror or exc})") from None


def write(doc: dict, path: Path) -> None:
    """Write atomically: a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(dumps(doc, path.suffix))
    os.replace(tmp, path)


def load(path: Path) -> dict:
    """A JSON or YAML document (by suffix) as a mapping, or one `BitallocError` naming the file."""
    text = read_text(path, str(path))
    if path.suffix in (".yaml", ".yml"):
        doc = parse_yaml(text, str(path))
    else:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            raise BitallocError(str(path), "is not valid JSON") from None
        except RecursionError:
            raise BitallocError(str(path), "nests too deeply to be a bitalloc document") from None
    if not isinstance(doc, dict):
        raise BitallocError(str(path), "is not a bitalloc document")
    return doc


def read(path: Path, schema: str) -> dict:
    """A document that declares `schema`."""
    doc = load(path)
    if doc.get("schema") != schema:
        raise BitallocError(str(path), f"is not a {schema} file")
    return doc
