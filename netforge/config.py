"""Loading nets and solvers from prototxt (protobuf text format) or YAML into the same messages.

Both formats fill the same protobuf messages, so they share one schema and one validation path.
Each load also returns a ``SourceMap`` from key paths such as ``("layer", 3, "bottom", 0)`` to
the line and column they came from, so that errors found later (an unknown layer type, a missing
bottom) can still point at ``file:line:col``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import yaml
from google.protobuf import text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from netforge.errors import ConfigError, did_you_mean
from netforge.proto import pb

KeyPath = tuple[str | int, ...]
M = TypeVar("M", bound=Message)

YAML_SUFFIXES = (".yaml", ".yml")


def format_path(path: KeyPath) -> str:
    """('layer', 3, 'bottom', 0) -> 'layer[3].bottom[0]'."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


@dataclass
class SourceMap:
    """Where each key path of a loaded message was written."""

    filename: str
    positions: dict[KeyPath, tuple[int, int]] = field(default_factory=dict)

    def where(self, path: KeyPath = ()) -> str:
        """'file:line:col' of the longest recorded prefix of ``path`` (just 'file' if none)."""
        for n in range(len(path), 0, -1):
            pos = self.positions.get(tuple(path[:n]))
            if pos is not None:
                return f"{self.filename}:{pos[0]}:{pos[1]}"
        return self.filename


# ---------------------------------------------------------------------------------------------
# prototxt


_TOKEN = re.compile(
    r"""(?P<ws>[ \t\r\f\v]+)|(?P<nl>\n)|(?P<comment>\#[^\n]*)
      |(?P<str>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
      |(?P<ident>[A-Za-z_][A-Za-z0-9_.]*)|(?P<num>[-+]?[0-9.][0-9A-Za-z.+-]*)
      |(?P<punct>[{}<>:\[\],;])|(?P<other>.)""",
    re.VERBOSE,
)


def _scan_text_positions(text: str, desc: Descriptor) -> dict[KeyPath, tuple[int, int]]:
    """Key path -> (line, col) for a text-format message; best effort, never raises."""
    positions: dict[KeyPath, tuple[int, int]] = {}
    # Each frame: (path of the message, its descriptor, counts of repeated fields seen).
    stack: list[tuple[KeyPath, Descriptor | None, dict[str, int]]] = [((), desc, {})]
    line, line_start = 1, 0
    pending: tuple[KeyPath, FieldDescriptor | None] | None = None
    in_list = False
    for m in _TOKEN.finditer(text):
        kind = m.lastgroup
        col = m.start() - line_start + 1
        if kind == "nl":
            line += 1
            line_start = m.end()
            continue
        if kind in ("ws", "comment"):
            continue
        path, mdesc, counts = stack[-1]
        tok = m.group()
        if kind == "ident" and pending is None and not in_list:
            fd = mdesc.fields_by_name.get(tok) if mdesc is not None else None
            if fd is not None and fd.is_repeated:
                idx = counts.get(tok, 0)
                counts[tok] = idx + 1
                key: KeyPath = (*path, tok, idx)
            else:
                key = (*path, tok)
            positions.setdefault(key, (line, col))
            if key[-1] != tok:
                positions.setdefault(key[:-1], (line, col))
            pending = (key, fd)
            continue
        if tok in ("{", "<"):
            if pending is not None:
                key, fd = pending
                sub = fd.message_type if fd is not None else None
                stack.append((key, sub, {}))
            else:
                stack.append(((*path, "?"), None, {}))
            pending = None
        elif tok in ("}", ">"):
            if len(stack) > 1:
                stack.pop()
            pending = None
        elif tok == "[":
            in_list = True
        elif tok == "]":
            in_list = False
            pending = None
        elif tok == ":":
            continue
        elif pending is not None and not in_list:
            pending = None
    return positions


_NO_FIELD = re.compile(r'Message type "(?:netforge\.)?([\w.]+)" has no field named "(\w+)"')
_NO_ENUM = re.compile(r'Enum type "(?:netforge\.)?([\w.]+)" has no value named (\w+)')


def _explain_parse_error(msg: str) -> tuple[str, str | None]:
    """Rewrite protobuf's text-format error into ours, with a did-you-mean when possible."""
    msg = msg.replace('"netforge.', '"')
    m = _NO_FIELD.search(msg)
    if m:
        desc = _find_descriptor(m.group(1))
        if desc is not None:
            return (
                f"unknown field '{m.group(2)}' in {m.group(1)}",
                did_you_mean(m.group(2), desc.fields_by_name),
            )
    m = _NO_ENUM.search(msg)
    if m:
        enum = _find_enum(m.group(1))
        if enum is not None:
            return (
                f"unknown value '{m.group(2)}' for enum {m.group(1)} "
                f"(allowed: {', '.join(enum.values_by_name)})",
                did_you_mean(m.group(2), enum.values_by_name),
            )
    return msg.rstrip("."), None


def _find_descriptor(dotted: str) -> Descriptor | None:
    desc: Any = pb.DESCRIPTOR
    for part in dotted.split("."):
        table = desc.message_types_by_name if desc is pb.DESCRIPTOR else desc.nested_types_by_name
        desc = table.get(part)
        if desc is None:
            return None
    return desc


def _find_enum(dotted: str) -> Any:
    parent, _, name = dotted.rpartition(".")
    if not parent:
        return pb.DESCRIPTOR.enum_types_by_name.get(name)
    desc = _find_descriptor(parent)
    return desc.enum_types_by_name.get(name) if desc is not None else None


def parse_prototxt(text: str, message: M, filename: str) -> SourceMap:
    try:
        text_format.Parse(text, message, allow_unknown_extension=False)
    except text_format.ParseError as e:
        line, col = e.GetLine(), e.GetColumn()
        raw = str(e)
        raw = re.sub(r"^\d+:\d+ : ", "", raw)
        raw = re.sub(r"^'.*?': ", "", raw)
        msg, hint = _explain_parse_error(raw)
        where = f"{filename}:{line}:{col}" if line else filename
        raise ConfigError(msg, where, hint) from None
    return SourceMap(filename, _scan_text_positions(text, message.DESCRIPTOR))


# ---------------------------------------------------------------------------------------------
# YAML


class _Yaml:
    """Fills a message from a composed YAML node tree, recording positions as it goes."""

    def __init__(self, filename: str):
        self.filename = filename
        self.smap = SourceMap(filename)
        self.constructor = yaml.constructor.SafeConstructor()

    def where(self, node: yaml.Node) -> str:
        return f"{self.filename}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"

    def fill(self, node: yaml.Node, msg: Message, path: KeyPath) -> None:
        desc = msg.DESCRIPTOR
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError(
                f"{format_path(path) or 'the file'} must be a mapping of {desc.name} fields",
                self.where(node),
            )
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = self.constructor.construct_object(key_node)
            if not isinstance(key, str):
                raise ConfigError(f"keys must be field names, got {key!r}", self.where(key_node))
            fd = desc.fields_by_name.get(key)
            if fd is None:
                where = format_path(path) or desc.name
                raise ConfigError(
                    f"unknown field '{key}' in {desc.name} (at {where})",
                    self.where(key_node),
                    did_you_mean(key, desc.fields_by_name),
                )
            if key in seen:
                raise ConfigError(f"field '{key}' is given twice", self.where(key_node))
            seen.add(key)
            fpath = (*path, key)
            mark = key_node.start_mark
            self.smap.positions[fpath] = (mark.line + 1, mark.column + 1)
            if fd.is_repeated:
                is_seq = isinstance(value_node, yaml.SequenceNode)
                items = value_node.value if is_seq else [value_node]
                for i, item in enumerate(items):
                    ipath = (*fpath, i)
                    imark = item.start_mark
                    self.smap.positions[ipath] = (imark.line + 1, imark.column + 1)
                    if fd.type == FieldDescriptor.TYPE_MESSAGE:
                        self.fill(item, getattr(msg, key).add(), ipath)
                    else:
                        getattr(msg, key).append(self.scalar(item, fd, ipath))
            elif fd.type == FieldDescriptor.TYPE_MESSAGE:
                sub = getattr(msg, key)
                sub.SetInParent()
                if not (isinstance(value_node, yaml.ScalarNode) and value_node.value in ("", "~")):
                    self.fill(value_node, sub, fpath)
            else:
                setattr(msg, key, self.scalar(value_node, fd, fpath))

    def scalar(self, node: yaml.Node, fd: FieldDescriptor, path: KeyPath) -> Any:
        name = format_path(path)
        if not isinstance(node, yaml.ScalarNode):
            raise ConfigError(f"{name} must be a single value", self.where(node))
        value = self.constructor.construct_object(node)
        t = fd.type
        if t == FieldDescriptor.TYPE_ENUM:
            enum = fd.enum_type
            if isinstance(value, str):
                ev = enum.values_by_name.get(value)
                if ev is None:
                    raise ConfigError(
                        f"unknown value '{value}' for {name} "
                        f"(allowed: {', '.join(enum.values_by_name)})",
                        self.where(node),
                        did_you_mean(value, enum.values_by_name),
                    )
                return ev.number
            if isinstance(value, int) and not isinstance(value, bool):
                if value not in enum.values_by_number:
                    raise ConfigError(f"{value} is not a value of {enum.name}", self.where(node))
                return value
            raise ConfigError(f"{name} must be one of {', '.join(enum.values_by_name)}",
                              self.where(node))
        if t == FieldDescriptor.TYPE_BOOL:
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be true or false, got {value!r}", self.where(node))
            return value
        if t in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
            if isinstance(value, bool) or value is None or not isinstance(value, str | int | float):
                raise ConfigError(f"{name} must be a string, got {value!r}", self.where(node))
            text = value if isinstance(value, str) else node.value
            return text.encode() if t == FieldDescriptor.TYPE_BYTES else text
        if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
            if isinstance(value, str):
                try:
                    value = float(value)  # YAML 1.1 reads "1e-4" as a string
                except ValueError:
                    pass
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{name} must be a number, got {value!r}", self.where(node))
            return float(value)
        # integer types
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}", self.where(node))
        unsigned = t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64)
        if unsigned and value < 0:
            raise ConfigError(f"{name} must be ≥ 0, got {value}", self.where(node))
        bits = 64 if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64) else 32
        lo, hi = (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        if not lo <= value <= hi:
            raise ConfigError(f"{name} is out of range for {bits}-bit integers", self.where(node))
        return value


def parse_yaml(text: str, message: M, filename: str) -> SourceMap:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{filename}:{mark.line + 1}:{mark.column + 1}" if mark else filename
        raise ConfigError(f"invalid YAML: {e.problem or e.context}", where) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML: {e}", filename) from None
    loader = _Yaml(filename)
    if node is not None:
        loader.fill(node, message, ())
    return loader.smap


# ---------------------------------------------------------------------------------------------
# files


def is_yaml(path: str | os.PathLike[str]) -> bool:
    return str(path).lower().endswith(YAML_SUFFIXES)


def read_text(path: str | os.PathLike[str], what: str) -> str:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} file not found", str(path))
    if p.is_dir():
        raise ConfigError(f"{what} path is a directory, expected a file", str(path))
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} file is not UTF-8 text", str(path)) from None


def parse_message(text: str, message: M, filename: str, yaml_format: bool) -> SourceMap:
    if yaml_format:
        return parse_yaml(text, message, filename)
    return parse_prototxt(text, message, filename)


def load_message(path: str | os.PathLike[str], message: M, what: str) -> SourceMap:
    text = read_text(path, what)
    return parse_message(text, message, str(path), is_yaml(path))


def load_net_param(path: str | os.PathLike[str]) -> tuple[pb.NetParameter, SourceMap]:
    """Read a net definition (.prototxt or .yaml); binary .caffemodel files are read as well."""
    param = pb.NetParameter()
    if str(path).endswith(".caffemodel"):
        try:
            param.ParseFromString(Path(path).read_bytes())
        except (OSError, DecodeError) as e:
            raise ConfigError(f"cannot read binary NetParameter: {e}", str(path)) from None
        smap = SourceMap(str(path))
    else:
        smap = load_message(path, param, "net")
    if len(param.layers):
        # Caffe's legacy V0/V1 'layers' syntax: upgraded on load, like upgrade_proto.cpp.
        from netforge.upgrade import upgrade_loaded_net

        upgraded, new_smap = upgrade_loaded_net(param, smap, str(path))
        return upgraded, new_smap or smap
    return param, smap


def load_solver_param(path: str | os.PathLike[str]) -> tuple[pb.SolverParameter, SourceMap]:
    param = pb.SolverParameter()
    smap = load_message(path, param, "solver")
    return param, smap


def to_yaml(message: Message) -> str:
    """A message as netforge YAML (fields in schema order, enums by name)."""
    return yaml.safe_dump(_to_plain(message), sort_keys=False, default_flow_style=None, width=100)


def _to_plain(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for fd, value in message.ListFields():
        def conv(v: Any, fd: FieldDescriptor = fd) -> Any:
            if fd.type == FieldDescriptor.TYPE_MESSAGE:
                return _to_plain(v)
            if fd.type == FieldDescriptor.TYPE_ENUM:
                return fd.enum_type.values_by_number[v].name
            if fd.type == FieldDescriptor.TYPE_BYTES:
                return v.decode("latin-1")
            if fd.type == FieldDescriptor.TYPE_FLOAT:
                # The shortest decimal that is the same float32 (0.01, not 0.00999999977648).
                return float(str(np.float32(v)))
            return v

        out[fd.name] = [conv(v) for v in value] if fd.is_repeated else conv(value)
    return out


_OVERRIDE_PART = re.compile(r"^(\w+)(?:\[([^\]]+)\])?$")


def apply_overrides(message: Message, items: list[str] | tuple[str, ...],
                    origin: str = "--set") -> list[tuple[str, str, str]]:
    """Apply ``key.path=value`` overrides (typed and checked by the schema, like YAML).

    A scalar replaces the value, a repeated field is replaced as a whole (``test_iter=[10]`` or
    ``test_iter=10``). Entries of a repeated message are picked by index or by name:
    ``layer[3].convolution_param.num_output=32``, ``layer[mnist].data_param.batch_size=32``
    (every layer named ``mnist``). Returns (key, old, new) for each change, for the log.
    """
    changes = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        where = f"{origin} {item}"
        if not sep or not key:
            raise ConfigError("an override must look like key=value (e.g. max_iter=1000)", where)
        parts = key.split(".")
        targets: list[Any] = [message]
        for k, part in enumerate(parts):
            m = _OVERRIDE_PART.match(part)
            name, selector = (m.group(1), m.group(2)) if m else (part, None)
            desc = targets[0].DESCRIPTOR
            fd = desc.fields_by_name.get(name)
            at = ".".join(parts[:k]) or desc.name
            if fd is None:
                raise ConfigError(f"unknown field '{name}' in {desc.name} (at {at})", where,
                                  did_you_mean(name, desc.fields_by_name))
            last = k == len(parts) - 1
            if last and selector is None:
                break
            if fd.type != FieldDescriptor.TYPE_MESSAGE or fd.is_repeated != (selector is not None):
                raise ConfigError(f"'{'.'.join(parts[:k + 1])}' is not a single message; pick "
                                  f"an entry of a repeated message with [index] or [name]"
                                  if fd.is_repeated and fd.type == FieldDescriptor.TYPE_MESSAGE
                                  else f"'{'.'.join(parts[:k + 1])}' is not a single message; "
                                  "only its own value can be overridden", where)
            if selector is None:
                targets = [getattr(t, name) for t in targets]
                continue
            picked = []
            for t in targets:
                entries = getattr(t, name)
                if selector.lstrip("-").isdigit():
                    i = int(selector)
                    if not -len(entries) <= i < len(entries):
                        raise ConfigError(f"{name}[{i}] does not exist ({len(entries)} entries)",
                                          where)
                    picked.append(entries[i])
                else:
                    picked += [e for e in entries if getattr(e, "name", None) == selector]
            if not picked:
                names = [getattr(e, "name", "") for t in targets for e in getattr(t, name)]
                raise ConfigError(f"no {name} entry named '{selector}'", where,
                                  did_you_mean(selector, names))
            targets = picked
            if last:
                raise ConfigError(f"'{key}' names a whole message; set one of its fields", where)
        leaf = _OVERRIDE_PART.match(parts[-1]).group(1)  # type: ignore[union-attr]
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        for target in targets:
            update = type(target)()
            try:
                parse_yaml(yaml.safe_dump({leaf: value}), update, where)
            except ConfigError as e:
                raise ConfigError(e.message.replace(f"{leaf} ", f"{key} ", 1) if
                                  e.message.startswith(f"{leaf} ") else e.message,
                                  where, e.hint) from None
            old = _field_text(target, leaf)
            target.ClearField(leaf)
            target.MergeFrom(update)
            changes.append((key, old, _field_text(target, leaf)))
    return changes


def _field_text(msg: Message, name: str) -> str:
    fd = msg.DESCRIPTOR.fields_by_name[name]
    value = getattr(msg, name)
    if fd.is_repeated:
        return "[" + ", ".join(str(v) for v in value) + "]"
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        return "{" + text_format.MessageToString(value, as_one_line=True) + "}"
    if fd.type == FieldDescriptor.TYPE_ENUM:
        return fd.enum_type.values_by_number[value].name
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
