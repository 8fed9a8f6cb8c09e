"""privacy.merkle against an independent RFC 9162 implementation written here from the
RFC text: MTH, PATH and PROOF by their recursive definitions (2.1.1, 2.1.3.1, 2.1.4.1)
and the verification algorithms of 2.1.3.2 and 2.1.4.2 transcribed step by step --
for every tree size 1..64 and every index pair."""

from __future__ import annotations

import hashlib

import pytest

from privacy import merkle

N = 64


# ------------------------------------------------------- RFC 9162, from the text

def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def rfc_mth(d: list[bytes]) -> bytes:
    n = len(d)
    if n == 0:
        return _h(b"")
    if n == 1:
        return _h(b"\x00" + d[0])
    k = 1
    while k * 2 < n:
        k *= 2
    return _h(b"\x01" + rfc_mth(d[:k]) + rfc_mth(d[k:]))


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def rfc_path(m: int, d: list[bytes]) -> list[bytes]:
    n = len(d)
    if n == 1:
        return []
    k = _k(n)
    if m < k:
        return rfc_path(m, d[:k]) + [rfc_mth(d[k:])]
    return rfc_path(m - k, d[k:]) + [rfc_mth(d[:k])]


def rfc_subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [rfc_mth(d)]
    k = _k(n)
    if m <= k:
        return rfc_subproof(m, d[:k], b) + [rfc_mth(d[k:])]
    return rfc_subproof(m - k, d[k:], False) + [rfc_mth(d[:k])]


def rfc_proof(m: int, d: list[bytes]) -> list[bytes]:
    return rfc_subproof(m, d, True)


def rfc_verify_inclusion(leaf_index, tree_size, leaf_hash, path, root) -> bool:
    # 2.1.3.2, steps 1-5
    if leaf_index >= tree_size:
        return False
    fn, sn, r = leaf_index, tree_size - 1, leaf_hash
    for p in path:
        if sn == 0:
            return False
        if fn % 2 == 1 or fn == sn:
            r = _h(b"\x01" + p + r)
            if fn % 2 == 0:
                while not (fn % 2 == 1 or fn == 0):
                    fn //= 2
                    sn //= 2
        else:
            r = _h(b"\x01" + r + p)
        fn //= 2
        sn //= 2
    return sn == 0 and r == root


def rfc_verify_consistency(first, second, first_hash, second_hash, path) -> bool:
    # 2.1.4.2, steps 1-7 (first < second; equal sizes are handled by the caller)
    if not path:
        return False
    path = list(path)
    if first & (first - 1) == 0:
        path = [first_hash] + path
    fn, sn = first - 1, second - 1
    if fn % 2 == 1:
        while fn % 2 == 1:
            fn //= 2
            sn //= 2
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn % 2 == 1 or fn == sn:
            fr = _h(b"\x01" + c + fr)
            sr = _h(b"\x01" + c + sr)
            if fn % 2 == 0:
                while not (fn % 2 == 1 or fn == 0):
                    fn //= 2
                    sn //= 2
        else:
            sr = _h(b"\x01" + sr + c)
        fn //= 2
        sn //= 2
    return fr == first_hash and sr == second_hash and sn == 0


# ------------------------------------------------------------------ helpers

LEAVES = [f"entry {i}".encode() for i in range(N)]


class MemoryTree:
    """The stored perfect subtrees of privacy.merkle, built leaf by leaf like the coordinator."""

    def __init__(self, leaves: list[bytes]):
        self.nodes: dict[tuple[int, int], bytes] = {}
        for i, leaf in enumerate(leaves):
            self.nodes[(0, i)] = merkle.leaf_hash(leaf)
            level, idx = 0, i
            while idx & 1:
                self.nodes[(level + 1, idx >> 1)] = merkle.node_hash(
                    self.nodes[(level, idx - 1)], self.nodes[(level, idx)])
                level, idx = level + 1, idx >> 1

    def node(self, level: int, idx: int) -> bytes:
        return self.nodes[(level, idx)]

    def hashes(self, ranges) -> list[bytes]:
        return [merkle.range_hash(a, b, self.node) for a, b in ranges]


TREE = MemoryTree(LEAVES)
ROOTS = {n: rfc_mth(LEAVES[:n]) for n in range(N + 1)}


def _mutations(proof: list[bytes]):
    """Tampered variants: each hash flipped, one dropped, one appended."""
    for i in range(len(proof)):
        bad = list(proof)
        bad[i] = bytes([bad[i][0] ^ 1]) + bad[i][1:]
        yield bad
    if proof:
        yield proof[:-1]
    yield proof + [b"\x00" * 32]


# -------------------------------------------------------------------- tests

def test_hashing_known_answers():
    assert merkle.EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert merkle.leaf_hash(b"") == _h(b"\x00")
    assert merkle.node_hash(b"a" * 32, b"b" * 32) == _h(b"\x01" + b"a" * 32 + b"b" * 32)


@pytest.mark.parametrize("n", range(N + 1))
def test_roots(n):
    assert merkle.root_of(LEAVES[:n]) == (n, ROOTS[n])
    assert merkle.range_hash(0, n, TREE.node) == ROOTS[n]


@pytest.mark.parametrize("n", range(1, N + 1))
def test_inclusion_every_leaf(n):
    for m in range(n):
        proof = TREE.hashes(merkle.inclusion_ranges(m, n))
        assert proof == rfc_path(m, LEAVES[:n])
        leaf = merkle.leaf_hash(LEAVES[m])
        assert rfc_verify_inclusion(m, n, leaf, proof, ROOTS[n])
        merkle.verify_inclusion(leaf, m, n, proof, ROOTS[n])
        for bad in _mutations(proof):
            assert not rfc_verify_inclusion(m, n, leaf, bad, ROOTS[n])
            with pytest.raises(merkle.ProofError):
                merkle.verify_inclusion(leaf, m, n, bad, ROOTS[n])
        # the proof of another index, or for the tree one leaf larger, does not fit
        for idx, size in ((m ^ 1, n), (m, n + 1)):
            if idx < size <= N:
                assert not rfc_verify_inclusion(idx, size, leaf, proof, ROOTS[size])
                with pytest.raises(merkle.ProofError):
                    merkle.verify_inclusion(leaf, idx, size, proof, ROOTS[size])
        with pytest.raises(merkle.ProofError):
            merkle.verify_inclusion(merkle.leaf_hash(b"other"), m, n, proof, ROOTS[n])


@pytest.mark.parametrize("n", range(1, N + 1))
def test_consistency_every_pair(n):
    for m in range(1, n + 1):
        proof = TREE.hashes(merkle.consistency_ranges(m, n))
        assert proof == rfc_proof(m, LEAVES[:n])
        merkle.verify_consistency(m, n, ROOTS[m], ROOTS[n], proof)
        if m < n:
            assert rfc_verify_consistency(m, n, ROOTS[m], ROOTS[n], proof)
            for bad in _mutations(proof):
                assert not rfc_verify_consistency(m, n, ROOTS[m], ROOTS[n], bad)
                with pytest.raises(merkle.ProofError):
                    merkle.verify_consistency(m, n, ROOTS[m], ROOTS[n], bad)
            # a rewritten history: another old root, or another new root
            for old_root, new_root in ((ROOTS[m - 1], ROOTS[n]), (ROOTS[m], ROOTS[n - 1])):
                assert not rfc_verify_consistency(m, n, old_root, new_root, proof)
                with pytest.raises(merkle.ProofError):
                    merkle.verify_consistency(m, n, old_root, new_root, proof)
        else:
            with pytest.raises(merkle.ProofError, match="forked"):
                merkle.verify_consistency(m, n, ROOTS[m], ROOTS[m - 1], proof)
    merkle.verify_consistency(0, n, merkle.EMPTY_ROOT, ROOTS[n], [])


def test_shrinking_and_out_of_range_are_refused():
    with pytest.raises(merkle.ProofError, match="only grows"):
        merkle.verify_consistency(5, 4, ROOTS[5], ROOTS[4], [])
    with pytest.raises(merkle.ProofError, match="outside"):
        merkle.verify_inclusion(merkle.leaf_hash(LEAVES[3]), 3, 3, [], ROOTS[3])
    with pytest.raises(ValueError):
        merkle.inclusion_ranges(4, 4)
    with pytest.raises(ValueError):
        merkle.consistency_ranges(5, 4)


def test_root_builder_streams_prefix_roots():
    builder = merkle.RootBuilder()
    for i, leaf in enumerate(LEAVES):
        builder.add(leaf)
        assert builder.root() == ROOTS[i + 1]


def test_whole_subtrees_can_be_added_at_once():
    # what the offline verifier does with aligned blocks of leaves
    hashes = [merkle.leaf_hash(leaf) for leaf in LEAVES]
    builder = merkle.RootBuilder()
    builder.add_subtree(3, merkle.perfect_root(hashes[:8]))
    builder.add_subtree(3, merkle.perfect_root(hashes[8:16]))
    for h in hashes[16:20]:
        builder.add_hash(h)
    assert (builder.size, builder.root()) == (20, ROOTS[20])
    builder.add_subtree(2, merkle.perfect_root(hashes[20:24]))
    assert builder.root() == ROOTS[24]
    with pytest.raises(ValueError):
        builder.add_subtree(4, merkle.perfect_root(hashes[:16]))  # 24 is not a multiple of 16
    with pytest.raises(ValueError):
        merkle.perfect_root(hashes[:3])
