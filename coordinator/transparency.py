"""The audit log's Merkle tree in SQL: append, tree heads and proofs in O(log n) reads.

The leaves are the audit entries in seq order (leaf index = seq - 1); a leaf's input is
the entry's canonical JSON (:func:`coordinator.audit.leaf_input`, the exact bytes of its
line in a JSONL export). The table ``merkle_nodes`` holds every *complete* subtree
``(level, idx)`` (privacy/merkle.py): appending leaf n writes the leaf and each subtree it
completes -- one row per trailing one bit of n, after reading their left siblings in one
query. A tree head or a proof for any size is the fold of at most ~2 log2(n) stored
subtrees, read in one query; nothing is ever rebuilt.

:func:`append_leaf` runs inside ``audit.append``, in the caller's transaction and under
the audit head's lock, so the tree always has exactly the entries the log has.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from privacy import merkle

from .models import MerkleNode

__all__ = ["append_leaf", "consistency_proof", "inclusion_proof", "leaf_hash_at", "tree_root"]


def _fetch(session: Session, keys: Iterable[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
    keys = sorted(set(keys))
    if not keys:
        return {}
    rows = session.execute(
        select(MerkleNode.level, MerkleNode.idx, MerkleNode.hash)
        .where(tuple_(MerkleNode.level, MerkleNode.idx).in_(keys))
    )
    found = {(level, idx): bytes(h) for level, idx, h in rows}
    missing = [k for k in keys if k not in found]
    if missing:  # the tree and the log disagree: never answer from a partial tree
        raise LookupError(f"Merkle subtrees {missing[:3]} are missing: the tree is incomplete")
    return found


def append_leaf(session: Session, index: int, leaf_input: bytes) -> bytes:
    """Store leaf ``index`` and every subtree it completes; return the leaf hash.

    The caller holds the audit head's lock, so ``index`` is the current tree size.
    """
    h = merkle.leaf_hash(leaf_input)
    completes = (~index & (index + 1)).bit_length() - 1  # trailing one bits of index
    siblings = [(level, (index >> level) - 1) for level in range(completes)]
    known = _fetch(session, siblings)
    rows = [MerkleNode(level=0, idx=index, hash=h)]
    node = h
    for level, sibling in siblings:
        node = merkle.node_hash(known[(level, sibling)], node)
        rows.append(MerkleNode(level=level + 1, idx=sibling >> 1, hash=node))
    session.add_all(rows)
    return h


def _hashes(session: Session, ranges: list[tuple[int, int]]) -> list[bytes]:
    plans = [merkle.perfect_subtrees(a, b) for a, b in ranges]
    nodes = _fetch(session, (k for plan in plans for k in plan))
    return [merkle.fold_subtrees([nodes[k] for k in plan]) for plan in plans]


def tree_root(session: Session, size: int) -> bytes:
    """The root hash of the first ``size`` entries (the empty tree's hash for 0)."""
    return _hashes(session, [(0, size)])[0]


def leaf_hash_at(session: Session, index: int) -> bytes:
    return _fetch(session, [(0, index)])[(0, index)]


def inclusion_proof(session: Session, index: int, size: int) -> list[bytes]:
    """PATH(index, D[0:size]) of RFC 9162 2.1.3.1; ValueError if index >= size."""
    return _hashes(session, merkle.inclusion_ranges(index, size))


def consistency_proof(session: Session, old: int, new: int) -> list[bytes]:
    """PROOF(old, D[0:new]) of RFC 9162 2.1.4.1; ValueError unless 0 <= old <= new."""
    return _hashes(session, merkle.consistency_ranges(old, new))
