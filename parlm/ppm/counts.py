"""Byte-context counts in flat numpy tables of short byte strings (numba).

A PPM model of order K needs, for every context string c of length 0..K that occurred,
    total(c)  = number of updates of c (the reference's sum(counts.values())),
    unique(c) = number of distinct bytes seen after c,
    max(c)    = the largest single count after c,
and for every (c, b) the count of b after c. Both are keyed by a byte string: c itself for
the context fields and c+b (length 1..K+1) for the count. One row per string therefore holds
both, and the row of c+b found while updating position t is exactly the row of the order-|c|+1
context at position t+1, so each byte costs only K+1 lookups.

Layout: `slots` int64[R, 4], one row per string:
    [key, count(string) as a successor, total(string) as a context, unique << 32 | max]
split into one region per string length L = 0..K+1. Lengths 0..DENSE_MAX_LENGTH are dense
(row = region start + the bytes as an integer: 1 + 256 + 65,536 rows, always present), so the
hot short contexts stay in cache. Longer strings live in per-length open-addressing regions
(power-of-two size, linear probing, Fibonacci hashing of key = (L + 1) << 56 | bytes, key 0 =
empty) that grow by rehashing. Strings are packed most-recent-byte-lowest and are at most 7
bytes long, so the PPM order is at most 6. Deletion is only ever of the most recently inserted
key (LIFO, for the audit's roll-back), which keeps every probe chain intact.

`regions` int64[K+2, 5] holds per length: start row, size, hash shift (0 = dense), rows used,
capacity (rows allowed before the region must grow, MAX_LOAD of its size).
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

MAX_ORDER = 6
DENSE_MAX_LENGTH = 2
KEY, COUNT, TOTAL, UNIQUE_MAX = 0, 1, 2, 3
START, SIZE, SHIFT, USED, CAPACITY = 0, 1, 2, 3, 4
HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
LOW32 = (1 << 32) - 1
MAX_LOAD = 0.7
STRING_MASKS = np.array([(1 << (8 * k)) - 1 for k in range(8)], dtype=np.int64)
# First guess of distinct strings per byte of text, by length (measured on 150 MB of
# Wikipedia: 0.17 M / 0.81 M / 2.6 M / 6.3 M strings of length 3 / 4 / 5 / 6); regions grow.
DISTINCT_PER_BYTE = {3: 0.0015, 4: 0.0070, 5: 0.022, 6: 0.055, 7: 0.10}


@intrinsic
def prefetch_row(typingctx, array, row):
    """Ask the CPU to start loading the cache line of array[row, 0] (a hint; no effect on
    results). Hides the memory latency of hash probes one byte ahead."""
    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        ary = context.make_array(array_type)(context, builder, args[0])
        zero = context.get_constant(types.intp, 0)
        pointer = cgutils.get_item_pointer2(
            context, builder, data=ary.data, shape=cgutils.unpack_tuple(builder, ary.shape),
            strides=cgutils.unpack_tuple(builder, ary.strides), layout=array_type.layout,
            inds=[args[1], zero], wraparound=False, boundscheck=False)
        byte_pointer = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        function_type = ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32])
        function = cgutils.get_or_insert_function(builder.module, function_type, "llvm.prefetch.p0")
        builder.call(function, [builder.bitcast(pointer, byte_pointer), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()
    return types.void(array, row), codegen


@numba.njit(cache=True, inline="always")
def string_key(packed, length):
    """Key of the last `length` bytes of `packed` (most recent byte in the low 8 bits)."""
    return ((length + 1) << 56) | (packed & STRING_MASKS[length])


@numba.njit(cache=True, inline="always")
def home_row(regions, length, key):
    """First probe row of `key` in its length's hash region."""
    offset = np.int64((np.uint64(key) * HASH_MULTIPLIER) >> np.uint64(regions[length, SHIFT]))
    return regions[length, START] + offset


@numba.njit(cache=True, inline="always")
def probe_row(slots, regions, key, length):
    """The row holding hashed `key` in its length's region, else the empty row (key 0) where it
    would go: linear probing from `home_row` (keys are never 0)."""
    start = regions[length, START]
    mask = regions[length, SIZE] - 1
    row = home_row(regions, length, key)
    while True:
        k = slots[row, KEY]
        if k == key or k == 0:
            return row
        row = start + ((row - start + 1) & mask)


@numba.njit(cache=True, inline="always")
def find_row(slots, regions, packed, length):
    """Row of the last `length` bytes of `packed`, or -1 when absent (dense rows always exist)."""
    if length <= DENSE_MAX_LENGTH:
        return regions[length, START] + (packed & STRING_MASKS[length])
    key = string_key(packed, length)
    row = probe_row(slots, regions, key, length)
    return row if slots[row, KEY] == key else -1


@numba.njit(cache=True, inline="always")
def find_or_insert(slots, regions, packed, length):
    """(row, inserted) of the last `length` bytes of `packed`, inserting a zero row if absent."""
    if length <= DENSE_MAX_LENGTH:
        return regions[length, START] + (packed & STRING_MASKS[length]), False
    key = string_key(packed, length)
    row = probe_row(slots, regions, key, length)
    if slots[row, KEY] == key:
        return row, False
    slots[row, KEY] = key
    regions[length, USED] += 1
    return row, True


@numba.njit(cache=True)
def delete_last_inserted(slots, regions, row, length):
    """Remove the most recently inserted hashed row (LIFO roll-back only)."""
    for c in range(4):
        slots[row, c] = 0
    regions[length, USED] -= 1


@numba.njit(cache=True)
def prefetch_successors(slots, regions, packed, window_length, byte):
    """Prefetch the hashed rows (last k bytes) + byte, k = DENSE_MAX_LENGTH..window_length."""
    extended = (packed << 8) | byte
    for k in range(DENSE_MAX_LENGTH, window_length + 1):
        prefetch_row(slots, home_row(regions, k + 1, string_key(extended, k + 1)))


@numba.njit(cache=True)
def context_rows(slots, regions, packed, window_length, out):
    """out[k] = row of the last k bytes of the window (k = 0..window_length), inserting empty
    rows for strings not yet present (total 0: 'never seen')."""
    for k in range(window_length + 1):
        out[k], inserted = find_or_insert(slots, regions, packed, k)


@numba.njit(cache=True)
def _rehash_region(old, old_start, old_size, new, new_regions, length):
    start = new_regions[length, START]
    mask = new_regions[length, SIZE] - 1
    for r in range(old_start, old_start + old_size):
        key = old[r, KEY]
        if key == 0:
            continue
        row = home_row(new_regions, length, key)
        while new[row, KEY] != 0:
            row = start + ((row - start + 1) & mask)
        for c in range(4):
            new[row, c] = old[r, c]


def _region_size(rows: int) -> int:
    return 1 << max(10, int(np.ceil(np.log2(max(rows, 1) / MAX_LOAD))))


class CountTable:
    """All strings of length 0..order+1; hashed regions grow (rehash to twice the size)."""

    def __init__(self, order: int, stream_bytes: int = 0):
        if not 0 <= order <= MAX_ORDER:
            raise ValueError(f"order={order} is not supported: contexts are packed into 56 bits, "
                             f"so the order must be in 0..{MAX_ORDER}")
        self.order = order
        sizes = []
        for length in range(order + 2):
            if length <= DENSE_MAX_LENGTH:
                sizes.append(256 ** length)
            else:
                guess = DISTINCT_PER_BYTE.get(length, 0.1) * stream_bytes
                sizes.append(_region_size(int(min(guess, 256.0 ** length))))
        self.regions = self._layout(sizes)
        self.slots = np.zeros((int(self.regions[-1, START] + self.regions[-1, SIZE]), 4), dtype=np.int64)

    @staticmethod
    def _layout(sizes: list[int], used=None) -> np.ndarray:
        regions = np.zeros((len(sizes), 5), dtype=np.int64)
        start = 0
        for length, size in enumerate(sizes):
            regions[length, START] = start
            regions[length, SIZE] = size
            if length > DENSE_MAX_LENGTH:
                regions[length, SHIFT] = 64 - (size.bit_length() - 1)
                regions[length, CAPACITY] = int(MAX_LOAD * size)
            else:
                regions[length, CAPACITY] = size
            if used is not None:
                regions[length, USED] = used[length]
            start += size
        return regions

    @property
    def rows_used(self) -> int:
        """Strings stored: dense rows with any count plus every hashed row."""
        dense_end = int(self.regions[DENSE_MAX_LENGTH + 1, START]) if self.order + 1 > DENSE_MAX_LENGTH \
            else len(self.slots)
        dense = int(np.count_nonzero(self.slots[:dense_end, COUNT] | self.slots[:dense_end, TOTAL]))
        return dense + int(self.regions[DENSE_MAX_LENGTH + 1:, USED].sum())

    def ensure_room(self, rows: int) -> bool:
        """Grow every hashed region that cannot take `rows` more rows; True when any grew
        (row indices then moved, so callers recompute the rows they hold)."""
        sizes = [int(s) for s in self.regions[:, SIZE]]
        grow = False
        for length in range(DENSE_MAX_LENGTH + 1, len(sizes)):
            while int(self.regions[length, USED]) + rows > int(MAX_LOAD * sizes[length]) and \
                    sizes[length] < 2 * 256 ** length:
                sizes[length] *= 2
                grow = True
        if not grow:
            return False
        new_regions = self._layout(sizes, used=self.regions[:, USED])
        new = np.zeros((int(new_regions[-1, START] + new_regions[-1, SIZE]), 4), dtype=np.int64)
        for length in range(len(sizes)):
            old_start, old_size = int(self.regions[length, START]), int(self.regions[length, SIZE])
            if length <= DENSE_MAX_LENGTH or old_size == sizes[length]:
                new_start = int(new_regions[length, START])
                new[new_start:new_start + old_size] = self.slots[old_start:old_start + old_size]
            else:
                _rehash_region(self.slots, old_start, old_size, new, new_regions, length)
        self.slots, self.regions = new, new_regions
        return True

    def nbytes(self) -> int:
        return int(self.slots.nbytes)
