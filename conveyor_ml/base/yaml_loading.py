"""Reading a YAML file a person (or an attacker) wrote, with bounds, so a bad file costs a one-line error
instead of a traceback, minutes of CPU or gigabytes of memory.

A pipeline spec is a few hundred lines a few levels deep. The bounds are far above that and far below
what hurts:

- size: at most MAX_FILE_BYTES are read (a 50 MB file took 55 s to parse before it was refused);
- nesting: at most MAX_DEPTH levels, checked while the file is scanned and composed (PyYAML composes
  recursively, so 20k levels ended in RecursionError);
- aliases: allowed, but the document as its readers see it, every `*alias` expanded, may have at most
  MAX_NODES nodes and MAX_DEPTH levels (a 1.4 KB "billion laughs" expands to 10^9 nodes; validating it
  took 53 s and 5.5 GB). Anchors and aliases compose to a graph of shared nodes, so its expanded size is
  counted on the graph, without expanding anything.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from conveyor_ml.base.errors import ConveyorError

MAX_FILE_BYTES = 1024 * 1024
MAX_DEPTH = 64
MAX_NODES = 100_000


def load_yaml_file(path: Path, what: str = "a pipeline spec") -> Any:
    """The file's one YAML document as Python values.

    Raises ConveyorError (one line naming the file) for a directory, a file over MAX_FILE_BYTES, nesting
    deeper than MAX_DEPTH or more than MAX_NODES nodes once aliases are expanded; yaml.YAMLError for a
    syntax error and UnicodeDecodeError for a file that is not UTF-8 text, for the caller to word."""
    path = Path(path)
    if path.is_dir():
        raise ConveyorError(f"{path}: is a directory; pass {what} file (e.g. pipelines/mnist.yaml)")
    with open(path, "rb") as handle:
        raw = handle.read(MAX_FILE_BYTES + 1)  # never more, whatever stat says (a FIFO, /dev/zero)
    if len(raw) > MAX_FILE_BYTES:
        raise ConveyorError(f"{path}: larger than {MAX_FILE_BYTES // 1024} KiB, too large for {what}; "
                            "is it the right file?")
    return load_yaml_text(raw.decode("utf-8"), path)


def load_yaml_text(text: str, source: Path | str) -> Any:
    """`text` as Python values, within MAX_DEPTH and MAX_NODES (see load_yaml_file); `source` names it."""
    loader = _BoundedLoader(text, str(source))
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded(node, str(source))
        try:
            return loader.construct_document(node)
        except ValueError as exc:
            problem = ("an integer of more than 4,300 digits (Python's limit); no setting takes one"
                       if "integer string conversion" in str(exc) else ' '.join(str(exc).split())[:300])
            raise ConveyorError(f"{source}: a value cannot be read: {problem}") from None
    finally:
        loader.dispose()


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing to compose a node deeper than MAX_DEPTH."""

    def __init__(self, stream: str, source: str):
        super().__init__(stream)
        self.source = source
        self.depth = 0

    # The scanner reads ahead through every '[' that may start a simple key before it hands out one token
    # (quadratic: 50k levels took 5 s before the composer saw any), so nesting is refused there as well.
    def fetch_flow_collection_start(self, TokenClass):
        if self.flow_level >= MAX_DEPTH:
            self._too_deep(self.get_mark())
        super().fetch_flow_collection_start(TokenClass)

    def add_indent(self, column):
        if len(self.indents) >= MAX_DEPTH:
            self._too_deep(self.get_mark())
        return super().add_indent(column)

    def _too_deep(self, mark) -> None:
        raise ConveyorError(f"{self.source}:{mark.line + 1}:{mark.column + 1}: YAML nested deeper than "
                            f"{MAX_DEPTH} levels; a spec needs a handful")

    def compose_mapping_node(self, anchor):
        # PyYAML keeps the last of two equal keys without a word; in a spec that silently drops a setting.
        # Checked on the composed node, before `<<` merges (whose keys a mapping may override) are applied.
        node = super().compose_mapping_node(anchor)
        seen: dict[tuple[str, str], yaml.Node] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            first = seen.setdefault((key.tag, key.value), key)
            if first is not key:
                mark = key.start_mark
                raise ConveyorError(f"{self.source}:{mark.line + 1}:{mark.column + 1}: key {key.value!r} appears "
                                    f"twice in one mapping (first on line {first.start_mark.line + 1}); keep one")
        return node

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                self._too_deep(self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expanded(root: yaml.Node, source: str) -> None:
    """Counts the nodes and levels of the document with every alias expanded, on the composed graph (each
    shared node once, iteratively, so neither a deep chain of aliases nor a wide one costs more than the
    file's own size); refuses a recursive alias."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    visiting: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            children = _children(node)
            size[key] = 1 + sum(size[id(child)] for child in children)
            depth[key] = 1 + max((depth[id(child)] for child in children), default=0)
            visiting.discard(key)
            if size[key] > MAX_NODES or depth[key] > MAX_DEPTH:
                mark = node.start_mark
                problem = (f"has more than {MAX_NODES} nodes" if size[key] > MAX_NODES
                           else f"nests deeper than {MAX_DEPTH} levels")
                raise ConveyorError(f"{source}:{mark.line + 1}:{mark.column + 1}: this YAML, with its aliases (*name) "
                                    f"expanded, {problem}; write the values out or use `extends:`")
            continue
        if key in size:
            continue
        if key in visiting:
            mark = node.start_mark
            raise ConveyorError(f"{source}:{mark.line + 1}:{mark.column + 1}: a YAML alias refers to a node "
                                "that contains it (a cycle)")
        visiting.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in size)
