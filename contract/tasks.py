"""Multi-task models' contract: the tasks' names (a model has one output per task, in this order) and the
ranking score a service computes from their probabilities (`serve.rank_by`).

The expression is parsed once into a tree of numbers, `p_<task>` names and + - * / ** (no calls, no
attributes, no eval), so a configured string cannot run code in a replica.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable

import numpy as np

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_BINARY: dict[type, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    ast.Add: np.add, ast.Sub: np.subtract, ast.Mult: np.multiply, ast.Div: np.divide, ast.Pow: np.power,
}


def check_task_names(names: list[str], where: str = "data.labels") -> None:
    """Two or more distinct names usable in an expression (`p_<name>`)."""
    if len(names) < 2:
        raise ValueError(f"{where}: {len(names)} task(s); a multi-task model needs two or more (one task: data.label)")
    bad = [n for n in names if not _NAME.match(n)]
    if bad:
        raise ValueError(f"{where}: task names {bad} are not identifiers (letters, digits, _): they become p_<name>")
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: task names repeat: {names}")


class RankBy:
    """`serve.rank_by` compiled against a model's tasks: probabilities [n, T] → ranking scores [n].
    None ranks by the first task's probability."""

    def __init__(self, expression: str | None, tasks: list[str]) -> None:
        self.tasks = tasks
        self.text = expression.strip() if expression else f"p_{tasks[0]}"
        self._names = {f"p_{t}": i for i, t in enumerate(tasks)}
        try:
            tree = ast.parse(self.text, mode="eval").body
        except SyntaxError as e:
            raise ValueError(f"serve.rank_by={self.text!r} is not an expression: {e.msg}") from None
        self._check(tree)
        self._tree = tree

    def _check(self, node: ast.AST) -> None:
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            self._check(node.left)
            self._check(node.right)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            self._check(node.operand)
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
            pass
        elif isinstance(node, ast.Name):
            if node.id not in self._names:
                raise ValueError(f"serve.rank_by={self.text!r}: unknown name {node.id!r}; this model's are {sorted(self._names)}")
        else:
            raise ValueError(f"serve.rank_by={self.text!r}: {ast.unparse(node)!r} is not allowed; use numbers, "
                             f"{sorted(self._names)} and + - * / ** ( )")

    def __call__(self, probs: np.ndarray) -> np.ndarray:
        """Scores of rows `probs` [n, T]."""
        with np.errstate(all="ignore"):  # 0/0 and the like rank last (NaN), not raise in a request
            out = np.asarray(self._eval(self._tree, probs), dtype=np.float64)
        return np.broadcast_to(out, (probs.shape[0],)).copy()

    def _eval(self, node: ast.AST, probs: np.ndarray) -> np.ndarray:
        if isinstance(node, ast.BinOp):
            return _BINARY[type(node.op)](self._eval(node.left, probs), self._eval(node.right, probs))
        if isinstance(node, ast.UnaryOp):
            v = self._eval(node.operand, probs)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.Constant):
            return np.asarray(float(node.value))  # type: ignore[arg-type]  # _check let only int and float through
        assert isinstance(node, ast.Name)
        return probs[:, self._names[node.id]].astype(np.float64)
