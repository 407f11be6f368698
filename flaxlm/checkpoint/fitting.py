"""Does a checkpoint fit the state it is restored into? The saved array shapes (read from
Orbax's metadata when the checkpoint is verified) against the ones asked for, compared before
anything is read, so a changed model config is one line naming the first parameter that
differs instead of an Orbax error from deep inside the restore."""

from __future__ import annotations

from typing import Any

import orbax.checkpoint as ocp


def saved_shapes(tree: Any) -> dict[str, tuple]:
    """'params/blocks_0/attn/query/kernel' -> shape, for every array of a serialized tree."""
    flat = ocp.tree.to_flat_dict(tree, sep="/")
    return {k: tuple(v.shape) for k, v in flat.items() if hasattr(v, "shape")}


def fit_problem(saved: dict[str, tuple], abstract_state: Any) -> str | None:
    """None if ``saved`` (:func:`saved_shapes`) has exactly the arrays of ``abstract_state``;
    else the first difference (parameters first, then optimizer entries), and how many more."""
    wanted = saved_shapes(ocp.tree.serialize_tree(abstract_state, keep_empty_nodes=True))
    differences = []
    for key in sorted(saved.keys() | wanted.keys(), key=lambda k: (k[:7] != "params/", k)):
        if key not in saved:
            differences.append(f"{key} {wanted[key]} is not in the checkpoint")
        elif key not in wanted:
            differences.append(f"{key} {saved[key]} is in the checkpoint but not expected")
        elif saved[key] != wanted[key]:
            differences.append(f"{key} is saved as {saved[key]}, expected {wanted[key]}")
    if not differences:
        return None
    more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
    return differences[0] + more
