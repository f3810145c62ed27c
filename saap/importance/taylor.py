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


def atom_sums(
    name: str, values: torch.Tensor, head_dim: int
) -> tuple[str, torch.Tensor]:
    """Sum one projection's per-element values over each atom it touches.

    Atoms are query heads, key/value heads and MLP channels; a head spans
    ``head_dim`` consecutive rows (columns for o_proj).
    """
    atom, axis = PROJ_ATOMS[name]
    per_index = values if values.dim() == 1 else values.sum(1 - axis)  # (rows or cols,)
    if atom == "mlp":
        return atom, per_index
    return atom, per_index.reshape(-1, head_dim).sum(1)  # (heads,)


def groups_from_atoms(
    atoms: Mapping[str, torch.Tensor],
    num_kv_heads: int,
    finish: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
) -> dict[str, torch.Tensor]:
    """Group scores from atom sums: ``q_head`` (H,), ``kv_group`` (KV,), ``mlp``."""
    q_head = atoms["q_head"]
    group = q_head.numel() // num_kv_heads
    kv_group = q_head.reshape(num_kv_heads, group).sum(1) + atoms["kv_head"]
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


def taylor_vector_salience(
    weights: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Signed first-order terms ``W * dL/dW``; group score |sum| (vector-wise)."""
    return {name: weights[name] * grads[name] for name in weights}


def taylor_element1_salience(
    weights: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Element-wise first-order ``|W * dL/dW|``."""
    return {name: (weights[name] * grads[name]).abs() for name in weights}


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
