"""Group reductions of per-element saliences over a layer's coupled structures.

Pure tensor maths: no models, no files. A layer's coupled structures are

- query head ``h``: rows ``h*hd:(h+1)*hd`` of q_proj (and its bias) and the same
  columns of o_proj;
- key/value head ``k``: the same rows of k_proj and v_proj (and biases);
- kv group ``k``: kv head ``k`` with its ``H/KV`` query heads;
- MLP channel ``j``: row ``j`` of gate_proj and up_proj and column ``j`` of down_proj.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

# names of the per-element tensors of one layer, as in the transformer's modules


# which atom each projection's rows/columns belong to: (atom, axis of the atom)
PROJ_ATOMS = {
    "q": ("q_head", 0),
    "o": ("q_head", 1),
    "k": ("kv_head", 0),
    "v": ("kv_head", 0),
    "q_bias": ("q_head", 0),
    "k_bias": ("kv_head", 0),
    "v_bias": ("kv_head", 0),
    "gate": ("mlp", 0),
    "up": ("mlp", 0),
    "down": ("mlp", 1),
}


def index_values(name: str, values: torch.Tensor) -> torch.Tensor:
    """One projection's per-element ``values`` summed over the axis that is not
    its atom's: one value per row (per column for o_proj and down_proj); a bias
    is one value per row already. Leading batch dimensions are kept."""
    if name.endswith("_bias"):
        return values
    _, axis = PROJ_ATOMS[name]
    return values.sum(-1 if axis == 0 else -2)


def atoms_of_index(name: str, per_index: torch.Tensor, head_dim: int):
    """Per-row (or per-column) values summed over each atom: a head spans
    ``head_dim`` consecutive rows; an MLP channel is one row (or column).
    Leading batch dimensions are kept."""
    atom, _ = PROJ_ATOMS[name]
    if atom == "mlp":
        return atom, per_index
    return atom, per_index.reshape(*per_index.shape[:-1], -1, head_dim).sum(-1)


def atom_sums(
    name: str, values: torch.Tensor, head_dim: int
) -> tuple[str, torch.Tensor]:
    """Sum one projection's per-element values over each atom it touches.

    Atoms are query heads, key/value heads and MLP channels; a head spans
    ``head_dim`` consecutive rows (columns for o_proj).
    """
    return atoms_of_index(name, index_values(name, values), head_dim)


def add_atoms(
    total: dict[str, torch.Tensor], name: str, per_index: torch.Tensor, head_dim: int
) -> None:
    """Add one projection's per-index values into the atom sums ``total``."""
    atom, sums = atoms_of_index(name, per_index, head_dim)
    total[atom] = total[atom] + sums if atom in total else sums


def groups_from_atoms(
    atoms: Mapping[str, torch.Tensor],
    num_kv_heads: int,
    finish: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
) -> dict[str, torch.Tensor]:
    """Group scores from atom sums: ``q_head`` (H,), ``kv_group`` (KV,), ``mlp``
    (I,); leading batch dimensions are kept."""
    q_head = atoms["q_head"]
    group = q_head.shape[-1] // num_kv_heads
    kv_group = (
        q_head.reshape(*q_head.shape[:-1], num_kv_heads, group).sum(-1)
        + atoms["kv_head"]
    )
    return {
        "q_head": finish(q_head),
        "kv_group": finish(kv_group),
        "mlp": finish(atoms["mlp"]),
    }


def reduce_groups(
    salience: Mapping[str, torch.Tensor],
    num_kv_heads: int,
    head_dim: int,
    finish: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
) -> dict[str, torch.Tensor]:
    """Sum per-element ``salience`` over each group; apply ``finish`` per group.

    ``salience`` maps ``q, k, v, o, gate, up, down`` (shaped as the projection
    weights) and optionally ``q_bias, k_bias, v_bias`` to tensors.
    """
    atoms: dict[str, torch.Tensor] = {}
    for name, values in salience.items():
        atom, sums = atom_sums(name, values, head_dim)
        atoms[atom] = atoms[atom] + sums if atom in atoms else sums
    return groups_from_atoms(atoms, num_kv_heads, finish)


def element1_index(name: str, weight: torch.Tensor, grad: torch.Tensor):
    """Element-wise first order per row (column): ``sum |W * g|``."""
    return index_values(name, (weight * grad).abs())


def vector_row_index(name: str, weight: torch.Tensor, grad: torch.Tensor):
    """Vector-wise first order as LLM-Pruner's code computes it (TaylorImportance,
    ``vectorize``): ``|sum W * g|`` over each row (column) of each projection."""
    return index_values(name, weight * grad).abs()


def vector_group_index(name: str, weight: torch.Tensor, grad: torch.Tensor):
    """Signed ``sum W * g`` per row (column); the absolute value is taken once per
    whole group (``taylor_vector_group``)."""
    return index_values(name, weight * grad)


IndexFn = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]


def gradient_atoms(
    index_fn: IndexFn,
    weights: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    head_dim: int,
) -> dict[str, torch.Tensor]:
    """Atom sums of ``index_fn(name, W, g)`` over a layer's projections."""
    atoms: dict[str, torch.Tensor] = {}
    for name, weight in weights.items():
        add_atoms(atoms, name, index_fn(name, weight, grads[name]), head_dim)
    return atoms


def taylor_element2_salience(
    weights: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    fisher: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Element-wise second order ``|W g - 1/2 W^2 F|``, ``F`` the Fisher diagonal."""
    return {
        name: (
            weights[name] * grads[name] - 0.5 * weights[name].square() * fisher[name]
        ).abs()
        for name in weights
    }
