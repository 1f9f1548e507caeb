"""Unique names for what rnnedge adds to a graph: one mechanism for the builder and the passes.

Names are handed out when a node or initializer is created, not fixed afterwards: onnx_ir
keeps initializers by name, so two with one name would silently become one. A name is the
caller's hint when free, else ``hint_1``, ``hint_2``, ... (onnx_ir's NameFixPass scheme).
"""

from __future__ import annotations

import onnx_ir as ir


class Names:
    """The value and node names taken in one model (every scope), and fresh ones on demand."""

    def __init__(self, taken=()):
        self.used: set[str] = set(taken)

    @classmethod
    def of(cls, graph: ir.Graph) -> Names:
        """Every name in ``graph`` and its subgraphs (Scan/Loop/If bodies) taken.

        The iterator calls ``enter`` for ``graph`` itself and for every subgraph.
        """
        names = cls()

        def enter(g) -> None:
            for v in (*g.inputs, *g.outputs, *g.initializers.values()):
                names.take(v.name)

        for node in ir.traversal.RecursiveGraphIterator(graph, enter_graph=enter):
            names.take(node.name)
            for v in (*node.inputs, *node.outputs):
                if v is not None:
                    names.take(v.name)
        return names

    def take(self, name: str | None) -> str | None:
        """Mark ``name`` as used (a graph input or a name that must stay as it is)."""
        if name:
            self.used.add(name)
        return name

    def __call__(self, hint: str) -> str:
        """``hint``, or ``hint_1``, ``hint_2``, ...: the first not used yet (now used)."""
        name, i = hint, 0
        while name in self.used:
            i += 1
            name = f"{hint}_{i}"
        self.used.add(name)
        return name
