"""Dispatch on a type code inside numba code, compiling only the types a caller can reach.

`by_code(name, table)` makes a function `f(code, *args)` callable from numba code that calls
`table[code](*args)` and returns True, or returns False (calling nothing) for a code not in the table.
Where `code` is a compile-time constant (a global, or a closure's variable as in the per-type kernel
factories of cpu.py, decoders.py and kvattn.py) only that row's function is compiled: a kernel made
for one weight type no longer carries the loops of all fifteen, which is most of what the first run
after an install spends compiling. A runtime code gets a chain that tries the rows in turn.
"""
from __future__ import annotations

from numba import njit, types
from numba.extending import overload


def _chain(items: list):
    """Tries each (code, function) row in turn; False after the last."""
    if not items:
        return njit(lambda code, *args: False)
    (want, fn), rest = items[0], _chain(items[1:])

    def step(code, *args):
        if code == want:
            fn(*args)
            return True
        return rest(code, *args)
    return njit(step)


def by_code(name: str, table: dict):
    """The dispatch function over table {code: njit function}; see the module's doc."""
    # numba cannot pass star arguments to a function it inlines in its own IR (inline="always"):
    # such a row is called through a copy that LLVM may still inline
    table = {c: njit(fn.py_func) if fn.targetoptions.get("inline") == "always" else fn for c, fn in table.items()}
    any_code = _chain(sorted(table.items()))

    def dispatch(code, *args):
        raise TypeError(f"{name} is called from numba-compiled code")
    dispatch.__name__ = dispatch.__qualname__ = name

    @overload(dispatch, prefer_literal=True)
    def _typed(code, *args):
        if isinstance(code, types.IntegerLiteral):
            fn = table.get(code.literal_value)
            if fn is None:
                return lambda code, *args: False

            def one(code, *args):
                fn(*args)
                return True
            return one
        return lambda code, *args: any_code(code, *args)

    return dispatch
