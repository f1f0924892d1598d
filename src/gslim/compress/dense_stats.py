"""Second-order statistics of a k x k consumer over *every* output position, without unfolding.

The regression of a k x k conv has one column per (input channel, kernel offset), so its Gram
G = X^T X has (k*k)^2 blocks of C x C. For a stride-1 conv with zero padding, block
((i, j), (i', j')) sums x(q) x(q + d*(i' - i, j' - j))^T over the positions q that kernel offset
(i, j) reads: the same sum for every pair with the same offset *difference*, except at the
borders of the window. So G needs one C x C product per difference, (2k - 1)^2 / 2 of them
(13 for a 3 x 3 kernel instead of 41 upper blocks), plus products over the single rows and
columns a window trims at the map's border (zero padding makes most of the border free). The
cross term B = X^T Y is the gradient of the conv's weight: one backward-weight convolution.

Measured (``benchmarks/dense_stats.py``, BENCHMARKS.md): 1.1-3.5x faster than gathering and
multiplying every row, on late ResNet-sized maps. :func:`prefer_dense` takes it where a cost
model (:func:`dense_cost`, :func:`sampled_cost`) says it costs at most half of the sample it
replaces; it then uses every position, not a sample.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def explicit_padding(mod: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding the conv applies, also for ``padding='same'``."""
    # nn.Conv2d keeps this for every padding spec (it is what it hands F.pad for non-zero
    # modes), so 'same' with an even kernel gets its asymmetric split exactly as the conv does
    return tuple(int(p) for p in mod._reversed_padding_repeated_twice)  # type: ignore[return-value]


def supports_dense(mod: nn.Module) -> bool:
    """Whether :func:`dense_gram` is exact for ``mod``: a dense (groups 1), stride-1 k x k conv
    with zero padding (any dilation, symmetric or ``'same'`` padding)."""
    return (
        isinstance(mod, nn.Conv2d)
        and mod.groups == 1
        and tuple(mod.stride) == (1, 1)
        and mod.padding_mode == "zeros"
        and mod.kernel_size[0] * mod.kernel_size[1] > 1
    )


class _Geometry:
    """Where each kernel offset reads, in the coordinates of the unpadded input map."""

    def __init__(self, kernel: tuple, dilation: tuple, padding: tuple, H: int, W: int):
        self.kh, self.kw = kernel
        self.dh, self.dw = dilation
        left, right, top, bottom = padding
        self.H, self.W = H, W
        self.Ho = H + top + bottom - self.dh * (self.kh - 1)
        self.Wo = W + left + right - self.dw * (self.kw - 1)
        self.top, self.left = top, left

    def rows(self, i: int) -> tuple[int, int]:
        """Input rows that kernel row ``i`` reads (output rows shifted by the offset), clipped to
        the map: the rows of the padding contribute zeros."""
        a = self.dh * i - self.top
        return max(a, 0), min(a + self.Ho, self.H)

    def cols(self, j: int) -> tuple[int, int]:
        a = self.dw * j - self.left
        return max(a, 0), min(a + self.Wo, self.W)

    def differences(self):
        """Offset differences (di, dj) in one half-plane (the other half is the transpose)."""
        for di in range(0, self.kh):
            for dj in range(-(self.kw - 1), self.kw):
                if di == 0 and dj < 0:
                    continue
                yield di, dj


def _span(lo_hi: tuple[int, int], shift: int, size: int) -> tuple[int, int]:
    """The part of ``lo_hi`` whose positions shifted by ``shift`` stay inside [0, size)."""
    lo, hi = lo_hi
    return max(lo, -shift), min(hi, size - shift)


def _size(span: tuple[int, int]) -> int:
    return max(span[1] - span[0], 0)


@dataclass(frozen=True)
class _Block:
    """Gram block of kernel offsets ``a`` and ``b`` (flat indices): the sum over ``window`` (rows,
    cols), either directly or as the difference's bulk less the ``trimmed`` rows and cols."""

    a: int
    b: int
    window: tuple[tuple[int, int], tuple[int, int]]
    trimmed_rows: tuple[int, ...]
    trimmed_cols: tuple[int, ...]
    direct: bool


@dataclass(frozen=True)
class _Difference:
    shift: tuple[int, int]  # in input positions
    bulk: tuple[tuple[int, int], tuple[int, int]]  # rows, cols where both factors are inside the map
    blocks: tuple[_Block, ...]


@functools.lru_cache(maxsize=256)
def _plan(kernel: tuple, dilation: tuple, padding: tuple, H: int, W: int) -> tuple[_Difference, ...]:
    """The products that make up the Gram of a conv of this geometry on an H x W input."""
    g = _Geometry(kernel, dilation, padding, H, W)
    out = []
    for di, dj in g.differences():
        si, sj = g.dh * di, g.dw * dj
        R, K = _span((0, H), si, H), _span((0, W), sj, W)
        if _size(R) == 0 or _size(K) == 0:
            continue  # no position has both factors inside the map: the blocks are zero
        blocks = []
        for i in [i for i in range(g.kh) if 0 <= i + di < g.kh]:
            r = _span(g.rows(i), si, H)
            tr = tuple(k for k in range(*R) if not r[0] <= k < r[1])
            for j in [j for j in range(g.kw) if 0 <= j + dj < g.kw]:
                c = _span(g.cols(j), sj, W)
                tc = tuple(k for k in range(*K) if not c[0] <= k < c[1])
                direct = 2 * (len(tr) + len(tc)) > _size(R) + _size(K)  # mostly border
                a, b = i * g.kw + j, (i + di) * g.kw + (j + dj)
                blocks.append(_Block(a, b, (r, c), tr, tc, direct))
        out.append(_Difference((si, sj), (R, K), tuple(blocks)))
    return tuple(out)


def _geometry_key(mod: nn.Conv2d) -> tuple:
    return tuple(mod.kernel_size), tuple(mod.dilation), explicit_padding(mod)


class _ShiftedLayout:
    """The input zero-padded on the right of each map row (``pad`` columns, Wp = W + pad) and laid
    out (H, Wp, N, C): as a matrix, one row per position (images innermost), channels contiguous.
    A shift (si, sj) of the map is then a shift by (si * Wp + sj) * N rows: a position whose
    shifted column leaves the map lands in zeros (pad >= |sj|), one whose shifted row leaves it
    falls off the end, and images never mix. So a difference's bulk product is one matrix product
    of two row ranges of this matrix, and a window's product (a trimmed line, a block taken
    directly) one of two views of the padded map. Built from a channels-last input (as the
    statistics passes run) it is a copy of C-long runs, not a transpose: 12.6 -> 0.7 ms for 64
    images of 256 channels at 14 x 14, two threads, the products the same."""

    def __init__(self, x: torch.Tensor, pad: int):
        N, C, H, W = x.shape
        self.N, self.C, self.Wp = N, C, W + pad
        self.padded = x.new_zeros(H, self.Wp, N, C)
        self.padded[:, :W] = x.permute(2, 3, 0, 1)
        self.flat = self.padded.view(-1, C)

    def bulk(self, shift: tuple[int, int]) -> torch.Tensor:
        """sum over images and positions q with q and q + shift inside the map of x(q) x(q + shift)^T."""
        si, sj = shift
        n, off = self.flat.shape[0], (si * self.Wp + sj) * self.N
        lo, hi = max(0, -off), min(n, n - off)
        return self.flat[lo:hi].T @ self.flat[lo + off : hi + off]

    def window(self, r: tuple[int, int], c: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
        """sum over images and positions q in rows r x cols c of x(q) x(q + shift)^T (C x C)."""
        if r[0] >= r[1] or c[0] >= c[1]:
            return self.padded.new_zeros(self.C, self.C)
        si, sj = shift
        a = self.padded[r[0] : r[1], c[0] : c[1]].reshape(-1, self.C)
        b = self.padded[r[0] + si : r[1] + si, c[0] + sj : c[1] + sj].reshape(-1, self.C)
        return a.T @ b


def dense_gram(mod: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """G = X^T X (float32 products) of ``consumer_rows(mod, x)`` with every row, laid out as it
    lays out the columns: (C, kh, kw) channel-major. ``x``: the conv's input (N, C, H, W)."""
    return channel_major(dense_gram_offsets(mod, x))


def channel_major(G: torch.Tensor) -> torch.Tensor:
    """A (k*k, C, k*k, C) Gram of :func:`dense_gram_offsets` as the (C*k*k)^2 Gram of the unfolded rows."""
    kk, C = G.shape[:2]
    return G.permute(1, 0, 3, 2).reshape(C * kk, C * kk)


def dense_gram_offsets(mod: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """:func:`dense_gram` offset-major, (k*k, C, k*k, C), float32: the layout it is filled in."""
    kk, C = mod.kernel_size[0] * mod.kernel_size[1], x.shape[1]
    G = x.new_zeros(kk, C, kk, C, dtype=torch.float32)
    add_dense_gram(mod, x, G)
    mirror_offsets(G)
    return G


def add_dense_gram(mod: nn.Conv2d, x: torch.Tensor, total: torch.Tensor) -> None:
    """Add the Gram of ``consumer_rows(mod, x)`` (every row, float32 products) to ``total``, an
    offset-major (k*k, C, k*k, C) sum of any float dtype, on its upper offset blocks only (a <= b:
    45 of a 3 x 3 kernel's 81). The lower ones are the upper ones' transposes: a sum over batches
    leaves them alone and :func:`mirror_offsets` fills them once. Each block goes straight into
    the sum: no whole Gram per batch, written and read again (a 4,608-wide one: 85 MB in float32,
    its float64 add as long as half of its products)."""
    x = x.float()
    H, W = x.shape[2:]
    plan = _plan(*_geometry_key(mod), H, W)
    shifted = _ShiftedLayout(x, mod.dilation[1] * (mod.kernel_size[1] - 1))
    for diff in plan:
        (R, K), shift = diff.bulk, diff.shift
        full = shifted.bulk(shift)
        lines: dict[tuple[str, int], torch.Tensor] = {}

        def line(kind: str, k: int) -> torch.Tensor:
            if (kind, k) not in lines:
                lines[kind, k] = (
                    shifted.window((k, k + 1), K, shift)
                    if kind == "row"
                    else shifted.window(R, (k, k + 1), shift)
                )
            return lines[kind, k]

        for blk in diff.blocks:
            if blk.direct:
                block = shifted.window(*blk.window, shift)
            elif blk.trimmed_rows or blk.trimmed_cols:  # (the bulk less the window's trimmed lines)
                trims = [line("row", k) for k in blk.trimmed_rows] + [
                    line("col", k) for k in blk.trimmed_cols
                ]
                block = full - trims[0]
                for t in trims[1:]:
                    block -= t
                for kr in blk.trimmed_rows:  # the corners were subtracted twice
                    for kc in blk.trimmed_cols:
                        block += shifted.window((kr, kr + 1), (kc, kc + 1), shift)
            else:
                block = full
            # (the plan's differences lie in one half-plane: b >= a; a diagonal block is made
            # exactly symmetric once, on the sum, by mirror_offsets)
            total[blk.a, :, blk.b, :].add_(block)


def mirror_offsets(G: torch.Tensor) -> None:
    """Fill the lower offset blocks (a > b) of a (k*k, C, k*k, C) sum of :func:`add_dense_gram`
    from the upper ones, and each diagonal block's lower triangle from its upper one (its
    products' rounding need not be symmetric; the upper triangle of a sum is the sum of the
    upper triangles, so this is the same as making each batch's block symmetric)."""
    kk = G.shape[0]
    for a in range(kk):
        G[a, :, a, :] = G[a, :, a, :].triu() + G[a, :, a, :].triu(1).T
        for b in range(a + 1, kk):
            G[b, :, a, :] = G[a, :, b, :].T


def dense_cross(mod: nn.Conv2d, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """B = X^T Y (float32) for ``consumer_rows(mod, x)`` and target map ``y`` (N, O, Ho, Wo),
    all rows: the weight gradient of the conv with ``y`` as the output gradient."""
    left, right, top, bottom = explicit_padding(mod)
    x, padding = x.float(), (top, left)
    if left != right or top != bottom:  # ('same' with an even kernel) the conv cannot pad unevenly
        x, padding = F.pad(x, (left, right, top, bottom)), (0, 0)
    w = torch.nn.grad.conv2d_weight(
        x,
        (y.shape[1], x.shape[1], *mod.kernel_size),
        y.float(),
        stride=1,
        padding=padding,
        dilation=mod.dilation,
    )
    # row-major like X^T Y: the OMP's per-step products on B's residual run 4x slower on a transposed one
    return w.reshape(w.shape[0], -1).T.contiguous()


#: A product or block update costs about this many multiply-adds of dispatch overhead, plus
#: ELEMENT_MACS per element of the C x C block it writes (memory-bound). Rough fits, one thread:
#: a 64-channel 4 x 4 map at 8 images took 4.9 ms dense against 1.8 ms sampled (all overhead); a
#: 512-channel 2 x 2 map at 64 images 256 ms against 236 ms (the block writes); a 512-channel
#: 7 x 7 map at 64 images 1.05 s against 3.27 s.
OP_MACS = 1.0e6
ELEMENT_MACS = 8.0
#: Dense statistics are taken only where the model says they cost at most this share of the
#: sample's (its constants are rough, and small products run below the GEMM's peak).
DENSE_MARGIN = 0.5


def dense_cost(mod: nn.Conv2d, x_shape: tuple[int, ...]) -> float:
    """Multiply-adds of :func:`dense_gram` on one batch of shape ``x_shape``, overhead included."""
    N, C, H, W = x_shape
    positions, ops = 0, 0
    padded_width = W + mod.dilation[1] * (mod.kernel_size[1] - 1)  # the bulk runs over _ShiftedLayout
    for diff in _plan(*_geometry_key(mod), H, W):
        R, K = diff.bulk
        positions += _size(R) * padded_width
        rows = {k for b in diff.blocks if not b.direct for k in b.trimmed_rows}
        cols = {k for b in diff.blocks if not b.direct for k in b.trimmed_cols}
        positions += len(rows) * _size(K) + len(cols) * _size(R)
        ops += 1 + len(rows) + len(cols)
        for b in diff.blocks:
            if b.direct:
                positions += _size(b.window[0]) * _size(b.window[1])
            else:
                positions += len(b.trimmed_rows) * len(b.trimmed_cols)
            ops += 2 + len(b.trimmed_rows) * len(b.trimmed_cols)
    kk = mod.kernel_size[0] * mod.kernel_size[1]
    writes = ops * C * C + 3 * (kk * C) ** 2  # the blocks, the zeroed Gram and its re-layout
    return N * positions * C * C + ops * OP_MACS + ELEMENT_MACS * writes


def sampled_cost(mod: nn.Conv2d, x_shape: tuple[int, ...], rows: float) -> float:
    """Multiply-adds of the sampled statistics' Gram of ``rows`` rows on one batch of ``x_shape``
    (a wide Gram is formed as its upper blocks, :class:`gslim.compress.sums._Sums`)."""
    kk = mod.kernel_size[0] * mod.kernel_size[1]
    F = kk * x_shape[1]
    return rows * F * F * (0.5 if F >= 1536 else 1.0) + 3 * OP_MACS


def prefer_dense(mod: nn.Module, x_shape: tuple[int, ...], fraction: float, rows_per_image: int) -> bool:
    """Whether every position, through :func:`dense_gram`, costs less than ``fraction`` of them
    sampled (``x_shape``: the consumer's input batch)."""
    if len(x_shape) != 4 or not supports_dense(mod):
        return False
    rows = fraction * rows_per_image * x_shape[0]
    return dense_cost(mod, tuple(x_shape)) < DENSE_MARGIN * sampled_cost(mod, tuple(x_shape), rows)
