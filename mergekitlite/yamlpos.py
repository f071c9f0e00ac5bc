"""YAML loading that remembers where every key and value came from.

Pydantic reports errors by location tuple (``("models", 1, "paramters")``); to say
``recipe.yaml:7:5`` we need the line and column of that path, which PyYAML's composed node tree
has and its plain ``safe_load`` throws away. Duplicate keys, which PyYAML silently resolves to
the last one, are reported as errors here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class Mark:
    line: int  # 1-based
    column: int  # 1-based


@dataclass
class PositionedYaml:
    data: Any
    values: dict[Path, Mark] = field(default_factory=dict)  # where each value starts
    keys: dict[Path, Mark] = field(default_factory=dict)  # where each mapping key is written
    duplicates: list[tuple[Path, Mark]] = field(default_factory=list)
    span: tuple[int, int] = (0, 0)  # character range of this document in the text

    def locate(self, path: Path, *, prefer_key: bool = False) -> Mark | None:
        """The position of ``path``, or of its nearest ancestor that exists in the file."""
        for end in range(len(path), -1, -1):
            sub = path[:end]
            if prefer_key and sub in self.keys:
                return self.keys[sub]
            if sub in self.values:
                return self.values[sub]
            if sub in self.keys:
                return self.keys[sub]
        return None


class YamlSyntaxError(ValueError):
    def __init__(self, message: str, mark: Mark | None):
        self.mark = mark
        super().__init__(message)


def _mark(node: yaml.Node) -> Mark:
    return Mark(node.start_mark.line + 1, node.start_mark.column + 1)


def _syntax_error(exc: yaml.MarkedYAMLError) -> YamlSyntaxError:
    mark = exc.problem_mark
    where = Mark(mark.line + 1, mark.column + 1) if mark else None
    return YamlSyntaxError(f"invalid YAML: {exc.problem}", where)


def _build(root: yaml.Node, text: str) -> PositionedYaml:
    out = PositionedYaml(data=None)
    constructor = yaml.SafeLoader(text)

    def build(node: yaml.Node, path: Path) -> Any:
        out.values[path] = _mark(node)
        if isinstance(node, yaml.MappingNode):
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = constructor.construct_object(key_node, deep=True)
                key_path = (*path, key)
                if key in result:
                    out.duplicates.append((key_path, _mark(key_node)))
                out.keys[key_path] = _mark(key_node)
                result[key] = build(value_node, key_path)
            return result
        if isinstance(node, yaml.SequenceNode):
            return [build(item, (*path, i)) for i, item in enumerate(node.value)]
        return constructor.construct_object(node, deep=True)

    try:
        out.data = build(root, ())
    except yaml.constructor.ConstructorError as exc:
        raise _syntax_error(exc) from None
    out.span = (root.start_mark.index, root.end_mark.index)
    return out


def load_positioned_all(text: str) -> list[PositionedYaml]:
    """Every document of ``text`` (documents are separated by ``---``), with positions."""
    try:
        roots = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.MarkedYAMLError as exc:
        raise _syntax_error(exc) from None
    return [_build(root, text) for root in roots if root is not None]


def load_positioned(text: str) -> PositionedYaml:
    """Parse single-document ``text`` (YAML 1.1, safe tags only) into plain data plus positions."""
    docs = load_positioned_all(text)
    if len(docs) > 1:
        raise YamlSyntaxError(f"expected one YAML document, found {len(docs)}", None)
    return docs[0] if docs else PositionedYaml(data=None)
