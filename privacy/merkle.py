"""RFC 9162 section 2.1 Merkle trees: hashing, proof shapes and proof verification.

Pure functions over bytes, standard library only, so silos and the offline verifier
(``privacy.verify_log``) use exactly the code the coordinator's storage relies on.

* ``leaf_hash(d) = SHA-256(0x00 || d)``, ``node_hash(l, r) = SHA-256(0x01 || l || r)``,
  the empty tree's hash is ``SHA-256("")`` (RFC 9162 2.1.1).
* A tree of n > 1 leaves splits at k, the largest power of two < n: the left subtree is
  *perfect* (2^j leaves). Every hash a proof needs is therefore the hash of a range
  ``[a, b)`` whose binary decomposition is a run of aligned perfect subtrees
  (:func:`perfect_subtrees`); the coordinator stores exactly those subtrees keyed by
  ``(level, index)`` -- subtree ``(l, i)`` covers leaves ``[i * 2^l, (i + 1) * 2^l)`` --
  so any tree head or proof is a handful of keyed reads, never a rebuild.
* :func:`inclusion_ranges` and :func:`consistency_ranges` follow PATH (2.1.3.1) and
  PROOF/SUBPROOF (2.1.4.1); :func:`verify_inclusion` and :func:`verify_consistency`
  are the verification algorithms of 2.1.3.2 and 2.1.4.2, including the final checks
  that the proof was used up exactly (a proof with trailing hashes is refused).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "ProofError",
    "RootBuilder",
    "consistency_ranges",
    "fold_subtrees",
    "inclusion_ranges",
    "leaf_hash",
    "node_hash",
    "perfect_root",
    "perfect_subtrees",
    "range_hash",
    "root_of",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
_sha256 = hashlib.sha256


class ProofError(Exception):
    """A proof does not verify (or is not a proof for these sizes); ``str`` says why."""


def leaf_hash(entry: bytes) -> bytes:
    return _sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return _sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


# ---------------------------------------------------------------- tree shapes

def perfect_subtrees(a: int, b: int) -> list[tuple[int, int]]:
    """The aligned perfect subtrees ``(level, index)`` whose leaves make up ``[a, b)``.

    Valid for the ranges a tree of RFC 9162 shape hands out (``a`` a multiple of the
    largest power of two <= ``b - a``): largest first, left to right.
    """
    out, pos, size = [], a, b - a
    while size:
        level = size.bit_length() - 1
        if pos % (1 << level):
            raise ValueError(f"[{a}, {b}) is not a subtree range of a Merkle tree")
        out.append((level, pos >> level))
        pos += 1 << level
        size -= 1 << level
    return out


def fold_subtrees(hashes: Sequence[bytes]) -> bytes:
    """MTH of a range from its perfect subtrees (largest first): fold from the right."""
    if not hashes:
        return EMPTY_ROOT
    acc = hashes[-1]
    for h in reversed(hashes[:-1]):
        acc = node_hash(h, acc)
    return acc


def range_hash(a: int, b: int, node: Callable[[int, int], bytes]) -> bytes:
    """MTH(D[a:b]) given ``node(level, index)``, the stored perfect subtree hashes."""
    return fold_subtrees([node(level, i) for level, i in perfect_subtrees(a, b)])


def inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """The leaf ranges whose hashes form PATH(index, D[0:size]), leaf end first."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of size {size}")
    out: list[tuple[int, int]] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _split(hi - lo)
        if index - lo < k:
            out.append((lo + k, hi))
            hi = lo + k
        else:
            out.append((lo, lo + k))
            lo += k
    return out[::-1]


def consistency_ranges(old: int, new: int) -> list[tuple[int, int]]:
    """The leaf ranges whose hashes form PROOF(old, D[0:new]) (RFC 9162 2.1.4.1)."""
    if not 0 <= old <= new:
        raise ValueError(f"no consistency proof from size {old} to size {new}")
    out: list[tuple[int, int]] = []
    if old in (0, new):
        return out
    lo, hi, m, complete = 0, new, old, True
    while m != hi - lo:
        k = _split(hi - lo)
        if m <= k:
            out.append((lo + k, hi))
            hi = lo + k
        else:
            out.append((lo, lo + k))
            lo, m, complete = lo + k, m - k, False
    if not complete:
        out.append((lo, hi))
    return out[::-1]


def root_of(leaves: Iterable[bytes]) -> tuple[int, bytes]:
    """``(size, MTH)`` of the given leaf *inputs*."""
    builder = RootBuilder()
    for entry in leaves:
        builder.add(entry)
    return builder.size, builder.root()


class RootBuilder:
    """Streams leaves in and gives the tree head at any size so far, in O(log n) memory.

    Keeps the perfect subtrees of the current size (one per set bit), merging two of a
    level as soon as they exist -- the same hashes the coordinator stores.
    """

    __slots__ = ("_stack", "size")

    def __init__(self) -> None:
        self._stack: list[bytes] = []
        self.size = 0

    def add(self, entry: bytes) -> None:
        self.add_hash(_sha256(b"\x00" + entry).digest())

    def add_hash(self, h: bytes) -> None:
        stack, n = self._stack, self.size
        while n & 1:  # each trailing one bit of the old size is a completed pair
            h = _sha256(b"\x01" + stack.pop() + h).digest()
            n >>= 1
        stack.append(h)
        self.size += 1

    def add_subtree(self, level: int, h: bytes) -> None:
        """Add a perfect subtree of ``2**level`` leaves; the size must be a multiple of it."""
        if self.size % (1 << level):
            raise ValueError(f"a subtree of level {level} cannot start at leaf {self.size}")
        stack, n = self._stack, self.size >> level
        while n & 1:
            h = _sha256(b"\x01" + stack.pop() + h).digest()
            n >>= 1
        stack.append(h)
        self.size += 1 << level

    def root(self) -> bytes:
        return fold_subtrees(self._stack)


def perfect_root(hashes: Sequence[bytes]) -> bytes:
    """The root of a perfect subtree from its ``2**k`` leaf hashes, level by level."""
    if not hashes or len(hashes) & (len(hashes) - 1):
        raise ValueError("a perfect subtree has a power-of-two number of leaves")
    level = list(hashes)
    while len(level) > 1:
        level = [_sha256(b"\x01" + a + b).digest() for a, b in zip(level[::2], level[1::2], strict=True)]
    return level[0]


# -------------------------------------------------------------- verification

def _bad(message: str) -> ProofError:
    return ProofError(message)


def _walk(fn: int, sn: int, first: bytes, path: Sequence[bytes], *, too_long: str, too_short: str) -> tuple[bytes, bytes]:
    """The loop RFC 9162 2.1.3.2 and 2.1.4.2 share: fold ``path`` into two running hashes.

    ``fr`` takes only the hashes to the left of the path (it rebuilds the smaller
    tree's root: consistency proofs), ``sr`` every hash (the larger tree's root, or an
    inclusion proof's root). Both start at ``first``.
    """
    fr = sr = first
    for c in path:
        if sn == 0:
            raise _bad(too_long)
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            if not fn & 1:
                while not (fn & 1 or fn == 0):
                    fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise _bad(too_short)
    return fr, sr


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> None:
    """RFC 9162 2.1.3.2: ``leaf`` (a leaf *hash*) is at ``index`` of the tree ``root``.

    Returns nothing or raises ProofError.
    """
    if not 0 <= index < size:
        raise _bad(f"leaf index {index} is outside a tree of size {size}")
    _, r = _walk(index, size - 1, leaf, proof, too_long="the inclusion proof is longer than the tree is deep",
                 too_short="the inclusion proof is too short for this tree size")
    if r != root:
        raise _bad(f"leaf {index} is not in the tree of size {size} with this root")


def verify_consistency(old: int, new: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]) -> None:
    """RFC 9162 2.1.4.2: the tree ``new_root`` of size ``new`` extends ``old_root`` (size ``old``).

    Returns nothing or raises ProofError. Equal sizes need an empty proof and equal
    roots; from the empty tree every tree is consistent (with an empty proof).
    """
    if not 0 <= old <= new:
        raise _bad(f"cannot go from size {old} to size {new}: a log only grows")
    if old == 0 or old == new:
        if proof:
            raise _bad("the consistency proof must be empty for these sizes")
        if old == new and old_root != new_root:
            raise _bad(f"two different roots for the same size {old}: the log forked")
        return
    if not proof:
        raise _bad("the consistency proof is empty")
    path = list(proof)
    if old & (old - 1) == 0:  # old is a power of two: its root is the first subtree
        path.insert(0, old_root)
    fn, sn = old - 1, new - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr, sr = _walk(fn, sn, path[0], path[1:], too_long="the consistency proof has hashes left over",
                   too_short="the consistency proof is too short")
    if fr != old_root:
        raise _bad(f"the proof does not lead to the old root of size {old}: history was rewritten")
    if sr != new_root:
        raise _bad(f"the proof does not lead to the new root of size {new}")
