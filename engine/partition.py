"""Which shard of a cluster owns an instrument (contract: every publisher, shard and subscriber agrees).

Two ways, chosen in ``[cluster]``:

* **hash** (default): ``shard = fnv1a64(utf8(symbol)) % shards``.  FNV-1a 64-bit:
  start at ``0xcbf29ce484222325``; for each byte ``h = (h ^ byte) * 0x100000001b3 mod 2**64``.
  Stable across processes, hosts and languages (Python's ``hash()`` is salted and is
  not used); a C++/Java router computes the same shard in a few lines.
* **explicit**: ``partitions = [["ESZ6", "NQZ6"], ["CLF7"]]`` lists each shard's
  symbols; a symbol in no list falls back to the hash, so new instruments still
  land on exactly one shard.

A shard is a process of ``tickscore serve`` with ``[cluster] shard = k``; it scores
the instruments it owns and skips (counts) the others.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["fnv1a64", "Partition"]

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK64 = (1 << 64) - 1


def fnv1a64(data: bytes) -> int:
    """Return the 64-bit FNV-1a hash of ``data`` (unsigned)."""
    h = _FNV_OFFSET
    for b in data:
        h = ((h ^ b) * _FNV_PRIME) & _MASK64
    return h


class Partition:
    """The partition function of a cluster of ``shards`` shards.

    Parameters
    ----------
    shards : int
        Number of shards (>= 1).
    partitions : sequence of sequence of str, optional
        Explicit symbol lists, one per shard (``len(partitions) == shards``); symbols
        listed nowhere are hashed.
    """

    def __init__(self, shards: int, partitions: Sequence[Sequence[str]] = ()) -> None:
        if shards < 1:
            raise ValueError(f"shards = {shards}: a cluster has at least one shard")
        if partitions and len(partitions) != shards:
            raise ValueError(f"partitions lists {len(partitions)} shards, shards = {shards}")
        self.shards = int(shards)
        self.explicit: dict[str, int] = {}
        for k, syms in enumerate(partitions):
            for s in syms:
                if s in self.explicit:
                    raise ValueError(f"partitions: {s!r} is listed for shards {self.explicit[s]} and {k}")
                self.explicit[s] = k

    def shard_of(self, symbol: str) -> int:
        """Return the shard that owns ``symbol``."""
        k = self.explicit.get(symbol)
        if k is not None:
            return k
        return fnv1a64(symbol.encode()) % self.shards

    def owned(self, symbols: Sequence[str], shard: int) -> list[str]:
        """Return the symbols of ``symbols`` that ``shard`` owns, in their order."""
        return [s for s in symbols if self.shard_of(s) == shard]

    def __repr__(self) -> str:
        """Return a short description."""
        how = "explicit+hash" if self.explicit else "hash"
        return f"Partition(shards={self.shards}, {how})"
