"""YAML loading that remembers where every key and value came from, within fixed bounds.

Pydantic reports errors by location tuple (``("models", 1, "paramters")``); to say
``recipe.yaml:7:5`` we need the line and column of that path, which PyYAML's composed node tree
has and its plain ``safe_load`` throws away. Duplicate keys, which PyYAML (and so mergekit)
resolves to the last one, are recorded so that the recipe loader can warn about them.

Anchors and aliases make a YAML file a graph: a few hundred bytes can stand for billions of values
("billion laughs"), and turning that into plain data would take minutes and gigabytes. So a
file may hold at most ``MAX_VALUES`` values *after* alias expansion and nest at most
``MAX_DEPTH`` levels deep; beyond either, loading stops at once with a ``YamlSyntaxError`` naming
the alias (or value) and the limit. Both limits are far above any real recipe (an 80-layer
slice-by-slice recipe has about 2,000 values and nests 8 deep).

Merge keys (``<<: *defaults``) follow the YAML spec, as PyYAML up to 6.0.2 does: a mapping's own
keys win over merged ones, and of ``<<: [*a, *b]`` the first mapping wins. (PyYAML 6.0.3+ lets the
*later* one win when the two key strings are distinct objects: it depends on string interning.)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent, ScalarEvent
from yaml.resolver import Resolver

try:  # libyaml's parser: ~100x faster than PyYAML's, same events (marks count characters too)
    from yaml._yaml import CParser

    _PARSER_BASES: tuple[type, ...] = (CParser,)
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    _PARSER_BASES = (yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser)

Path = tuple[str | int, ...]

MAX_VALUES = 20_000  # per file, counting every value an alias stands for
MAX_DEPTH = 32  # mappings and sequences inside each other, aliases followed
_MERGE_TAG = "tag:yaml.org,2002:merge"


@dataclass(frozen=True)
class Mark:
    line: int  # 1-based
    column: int  # 1-based


Alias = tuple[str, Mark]  # an alias's anchor name and where the alias is written


@dataclass(frozen=True)
class Duplicate:
    """A key written twice in one mapping: the later value is the one used (YAML loaders, mergekit)."""

    path: Path
    mark: Mark  # the later (used) key
    earlier: Mark  # the earlier (ignored) key


@dataclass
class PositionedYaml:
    data: Any
    values: dict[Path, Mark] = field(default_factory=dict)  # where each value starts
    keys: dict[Path, Mark] = field(default_factory=dict)  # where each mapping key is written
    duplicates: list[Duplicate] = field(default_factory=list)
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


def _mark(obj: yaml.Node | yaml.Mark) -> Mark:
    m = obj.start_mark if isinstance(obj, yaml.Node) else obj
    return Mark(m.line + 1, m.column + 1)


def _syntax_error(exc: yaml.MarkedYAMLError) -> YamlSyntaxError:
    mark = exc.problem_mark
    where = Mark(mark.line + 1, mark.column + 1) if mark else None
    return YamlSyntaxError(f"invalid YAML: {exc.problem}", where)


def _too_deep(mark: Mark) -> YamlSyntaxError:
    return YamlSyntaxError(f"nested more than {MAX_DEPTH} levels deep (the limit for a recipe)", mark)


class _Budget:
    """Counts values against ``MAX_VALUES``."""

    def __init__(self) -> None:
        self.used = 0

    def take(self, at: Mark | yaml.Mark, alias: Alias | None) -> None:
        self.used += 1
        if self.used <= MAX_VALUES:
            return
        if alias is None:
            mark = at if isinstance(at, Mark) else _mark(at)
            raise YamlSyntaxError(f"more than {MAX_VALUES} values (the limit for a recipe)", mark)
        name, where = alias
        raise YamlSyntaxError(
            f"alias *{name} makes the file stand for more than {MAX_VALUES} values, the limit for a recipe "
            "(aliases of aliases multiply: a 'billion laughs' file?)",
            where,
        )


class _BoundedLoader(Composer, *_PARSER_BASES, SafeConstructor, Resolver):  # type: ignore[misc]
    """PyYAML's composer (ours comes first in the MRO, so that libyaml's C composer is not used)
    with a depth and size limit, remembering where each alias was written."""

    def __init__(self, text: str, budget: _Budget):
        for i, base in enumerate(_PARSER_BASES):  # the reader (first) takes the text
            base.__init__(self, *(() if i else (text,)))
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self.budget = budget
        self.depth = 0
        # (id(parent node), sequence index or id(key node)) -> (anchor name, where the alias is written)
        self.aliases: dict[tuple[int, int], Alias] = {}

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            node = super().compose_node(parent, index)
            if parent is not None and index is not None:  # keys are plain scalars (checked when built)
                where = index if isinstance(index, int) else id(index)
                self.aliases[(id(parent), where)] = (event.anchor, _mark(event.start_mark))
            return node
        self.budget.take(event.start_mark, None)
        if isinstance(event, ScalarEvent):
            return super().compose_node(parent, index)
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _too_deep(_mark(event.start_mark))
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _Builder:
    """Turns one composed document into plain data plus positions, expanding aliases within the budget."""

    def __init__(self, loader: _BoundedLoader, budget: _Budget):
        self.loader = loader
        self.budget = budget
        self.out = PositionedYaml(data=None)
        self.open: set[int] = set()  # nodes being built: an alias to one of them is a cycle

    def build(self, node: yaml.Node, path: Path, alias: Alias | None, depth: int, written: Alias | None = None) -> Any:
        """``alias``: the outermost alias being expanded (it pays for what it expands to);
        ``written``: the alias written at this very place, if the value is one (its position is the value's)."""
        mark = _mark(node)
        self.out.values[path] = written[1] if written else mark
        if isinstance(node, yaml.ScalarNode):
            if alias is not None:  # composed values were counted by the loader; repeats are counted here
                self.budget.take(mark, alias)
            return self._scalar(node)
        if depth > MAX_DEPTH:
            raise _too_deep(alias[1] if alias else mark)
        if id(node) in self.open:
            assert alias is not None  # only an alias can lead back into a value being built
            raise YamlSyntaxError(f"alias *{alias[0]} refers to a value that contains it", alias[1])
        if alias is not None:
            self.budget.take(mark, alias)
        self.open.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                items = []
                for i, item in enumerate(node.value):
                    here = self._alias_at(node, i)
                    items.append(self.build(item, (*path, i), alias or here, depth + 1, here))
                return items
            return self._mapping(node, path, alias, depth)
        finally:
            self.open.discard(id(node))

    def _alias_at(self, parent: yaml.Node, where: int | yaml.Node) -> Alias | None:
        if not self.loader.aliases:  # most recipes have none
            return None
        return self.loader.aliases.get((id(parent), where if isinstance(where, int) else id(where)))

    def _scalar(self, node: yaml.Node) -> Any:
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:
            raise _syntax_error(exc) from None
        except ValueError as exc:  # e.g. an integer with more digits than Python converts
            raise YamlSyntaxError(f"invalid value: {exc}", _mark(node)) from None

    def _pairs(
        self, node: yaml.MappingNode, alias: Alias | None, depth: int
    ) -> Iterator[tuple[yaml.Node, yaml.Node, Alias | None, Alias | None, bool]]:
        """(key, value, alias, written, merged) in the order a YAML loader assigns them: the pairs
        of ``<<: *anchor`` merges first (the first merged mapping winning), then the mapping's own."""
        own = []
        for key, value in node.value:
            if key.tag != _MERGE_TAG:
                own.append((key, value))
                continue
            via = alias or self._alias_at(node, key)
            sources = value.value if isinstance(value, yaml.SequenceNode) else [value]
            for sub in reversed(sources):
                if not isinstance(sub, yaml.MappingNode):
                    raise YamlSyntaxError("'<<' merges a mapping or a list of mappings", _mark(sub))
                if depth > MAX_DEPTH:
                    raise _too_deep(via[1] if via else _mark(sub))
                for k, v, a, written, _ in self._pairs(sub, via, depth + 1):
                    yield k, v, a or via, written, True
        for key, value in own:
            here = self._alias_at(node, key)
            yield key, value, alias or here, here, False

    def _mapping(self, node: yaml.MappingNode, path: Path, alias: Alias | None, depth: int) -> Any:
        result: dict[Any, Any] = {}
        own_keys: dict[Any, Mark] = {}
        for key_node, value_node, via, written, merged in self._pairs(node, alias, depth):
            if not isinstance(key_node, yaml.ScalarNode):
                raise YamlSyntaxError("a mapping key must be a plain value, not a list or mapping", _mark(key_node))
            key = self._scalar(key_node)
            key_path = (*path, key)
            key_mark = _mark(key_node)
            if not merged:
                if key in own_keys:
                    self.out.duplicates.append(Duplicate(key_path, key_mark, own_keys[key]))
                own_keys[key] = key_mark
            self.out.keys[key_path] = key_mark
            result[key] = self.build(value_node, key_path, via, depth + 1, written)
        return result


def load_positioned_all(text: str) -> list[PositionedYaml]:
    """Every document of ``text`` (documents are separated by ``---``), with positions."""
    budget = _Budget()
    loader = _BoundedLoader(text, budget)
    docs = []
    try:
        while loader.check_node():
            root = loader.get_node()
            if root is None:
                continue
            builder = _Builder(loader, budget)
            builder.out.data = builder.build(root, (), None, 1)
            builder.out.span = (root.start_mark.index, root.end_mark.index)
            docs.append(builder.out)
    except yaml.MarkedYAMLError as exc:
        raise _syntax_error(exc) from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (e.g. a NUL byte)
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        raise YamlSyntaxError(f"invalid YAML: {exc.reason}", Mark(line, column)) from None
    finally:
        loader.dispose()
    return docs


def load_positioned(text: str) -> PositionedYaml:
    """Parse single-document ``text`` (YAML 1.1, safe tags only) into plain data plus positions."""
    docs = load_positioned_all(text)
    if len(docs) > 1:
        raise YamlSyntaxError(f"expected one YAML document, found {len(docs)}", None)
    return docs[0] if docs else PositionedYaml(data=None)
