"""Compiled CPU kernels (numba, ``parallel=True``, ``cache=True``) with ``reference.py``'s semantics.

Imported lazily by ``library.kernel_for`` on the first CPU call, never by ``import batchnorm``;
each kernel is compiled on its first use per dtype and cached on disk by numba.

Memory passes (the reason this is faster than ``torch.nn``): the training forward reads x once
for the statistics and once more to write y; the backward reads (dy, x) once for the two per-channel sums
Σdy and Σdy·(x−μ), and once more to write dx — eight passes over an activation in all.

Numerics: per block (≤ 4096 values, or ≤ 256 rows), the sum and the sum of squares are taken of
d = x − x_first (exact for clustered data), so Σd² − (Σd)²/n cancels at most the block's own
(x_first − μ_b)², not μ²: no E[x²]−E[x]² cancellation; blocks are merged in float64 with Chan
et al.'s formula (Σ M2_b + Σ n_b(μ_b − μ)²). The mean is carried as
a float32 pair (μ_hi + μ_lo) so that x − μ_hi is exact for data with a large offset.

Layouts: a contiguous (N, C, *S) tensor is viewed as planes (N, C, L); a channels_last one (and a
(N, C) one) as rows (R, C) with the channels contiguous. Parallel work items are blocks of
planes, or chunks of rows with per-chunk partial sums, so a few channels still use both cores.
float32 and float64 run natively; bfloat16 is converted to float32 with torch around the
kernels (one extra pass each way, documented in docs/performance.md).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import njit, prange
from numba.extending import overload
from torch import Tensor

from . import buffers
from .reference import acc_dtype, as_dtype

# No nnan/ninf: NaN and inf still propagate. "reassoc" (needed to vectorize a sum) only on the
# reductions: on (x − μ_hi)·a + b it would let LLVM fold μ_hi into b and lose the exact centring.
_FM_RED = {"nsz", "arcp", "contract", "reassoc", "afn"}
_FM = {"nsz", "arcp", "contract", "afn"}
_RED = dict(parallel=True, cache=True, fastmath=_FM_RED, nogil=True)
_PAR = dict(parallel=True, cache=True, fastmath=_FM, nogil=True)
_SER = dict(cache=True, fastmath=_FM, nogil=True)
# Merging the per-block partials is a few thousand float64 adds: one thread, no pool wake-up.
_SER_MERGE = dict(cache=True, fastmath=_FM_RED, nogil=True)
_BLOCK = 4096  # planes: values per work item (16 KB float32, in L1 for the block's second pass)
_SUB = 32768  # rows: values per sub-block of a chunk (128 KB float32, in L2)
_SERIAL_BELOW = 1 << 16  # fewer values than this: one thread (waking the pool costs more)
_NATIVE = (torch.float32, torch.float64)
_DTYPES = (torch.float32, torch.float64, torch.bfloat16)

# Activation / saved-tensor modes shared by the fused kernels.
ACT_NONE, ACT_RELU, ACT_LEAKY = 0, 1, 2
SAVED_X, SAVED_X_ACT, SAVED_Y = 0, 1, 2  # backward from x, from x through an activation, from y


# ====================================================================== statistics (Algorithm 1)
@njit(inline="always")
def _block(it, nb, c_, bs, l_):
    """Work item ``it`` of the planes kernels → (n, c, lo, hi): plane (n, c), values lo:hi."""
    p = it // nb
    n = p // c_
    c = p - n * c_
    lo = (it - p * nb) * bs
    return n, c, lo, min(lo + bs, l_)


@njit(**_RED)
def _planes_stats(x, bs, pmean, pm2, pcnt):
    n_, c_, l_ = x.shape
    nb = (l_ + bs - 1) // bs
    for it in prange(n_ * c_ * nb):
        n, c, lo, hi = _block(it, nb, c_, bs, l_)
        blk = x[n, c, lo:hi]  # a slice indexed from 0: LLVM drops the wraparound check, vectorizes
        sh = blk[0]  # shift by a sample of the block: d = x − sh is exact for clustered data
        s = sh - sh
        q = sh - sh
        for i in range(hi - lo):
            d = blk[i] - sh
            s += d
            q += d * d
        k = np.float64(hi - lo)
        dm = np.float64(s) / k
        pmean[it] = np.float64(sh) + dm
        pm2[it] = max(np.float64(q) - np.float64(s) * dm, 0.0)  # Σ(d − mean d)², shifted data
        pcnt[it] = k


@njit(**_SER_MERGE)
def _planes_merge(pmean, pm2, pcnt, n_, c_, nb, mean, var):
    for c in range(c_):
        s = 0.0
        tot = 0.0
        for n in range(n_):
            base = (n * c_ + c) * nb
            for b in range(nb):
                s += pmean[base + b] * pcnt[base + b]
                tot += pcnt[base + b]
        mu = s / tot  # μ_B = 1/m Σ x_i
        m2 = 0.0
        for n in range(n_):
            base = (n * c_ + c) * nb
            for b in range(nb):
                d = pmean[base + b] - mu
                m2 += pm2[base + b] + pcnt[base + b] * d * d  # Chan: Σ M2_b + Σ n_b (μ_b − μ)²
        mean[c] = mu
        var[c] = m2 / tot  # σ²_B, biased


@njit(**_RED)
def _rows_stats(x, nchunk, sub, pmean, pm2, pcnt):
    r_, c_ = x.shape
    for k in prange(nchunk):
        r0 = k * r_ // nchunk
        r1 = (k + 1) * r_ // nchunk
        sh = np.empty(c_, x.dtype)
        s = np.empty(c_, x.dtype)
        q = np.empty(c_, x.dtype)
        na = 0.0
        for rs in range(r0, r1, sub):
            re = min(rs + sub, r1)
            kk = np.float64(re - rs)
            for c in range(c_):
                sh[c] = x[rs, c]
                s[c] = 0
                q[c] = 0
            r = rs
            while r + 4 <= re:  # four rows per sweep: a quarter of the accumulator traffic
                x0, x1, x2, x3 = x[r], x[r + 1], x[r + 2], x[r + 3]  # slices indexed from 0
                for c in range(c_):
                    m = sh[c]
                    d0 = x0[c] - m
                    d1 = x1[c] - m
                    d2 = x2[c] - m
                    d3 = x3[c] - m
                    s[c] += (d0 + d1) + (d2 + d3)
                    q[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
                r += 4
            while r < re:
                xr = x[r]
                for c in range(c_):
                    d = xr[c] - sh[c]
                    s[c] += d
                    q[c] += d * d
                r += 1
            for c in range(c_):  # Chan et al.: merge this sub-block into the chunk's running stats
                dm = np.float64(s[c]) / kk
                bm = np.float64(sh[c]) + dm
                bq = max(np.float64(q[c]) - np.float64(s[c]) * dm, 0.0)
                if na == 0.0:
                    pmean[k, c] = bm
                    pm2[k, c] = bq
                else:
                    tot = na + kk
                    delta = bm - pmean[k, c]
                    pmean[k, c] += delta * (kk / tot)
                    pm2[k, c] += bq + delta * delta * (na * kk / tot)
            na += kk
        pcnt[k] = na


@njit(**_SER_MERGE)
def _rows_merge(pmean, pm2, pcnt, mean, var):
    nchunk, c_ = pmean.shape
    for c in range(c_):
        s = 0.0
        tot = 0.0
        for k in range(nchunk):
            s += pmean[k, c] * pcnt[k]
            tot += pcnt[k]
        mu = s / tot
        m2 = 0.0
        for k in range(nchunk):
            d = pmean[k, c] - mu
            m2 += pm2[k, c] + pcnt[k] * d * d
        mean[c] = mu
        var[c] = m2 / tot


# ====================================================================== y = act(γ x̂ + β)
@njit(**_SER)
def _affine_coef(mean, var, w, b, eps, mhi, a, bb):
    """y = (x − μ_hi)·a + bb with a = γ/sqrt(σ²+ε), bb = β − μ_lo·a (μ = μ_hi + μ_lo)."""
    for c in range(mean.shape[0]):
        sc = w[c] / math.sqrt(var[c] + eps)
        hi = mhi.dtype.type(mean[c])
        mhi[c] = hi
        a[c] = sc
        bb[c] = b[c] - (mean[c] - np.float64(hi)) * sc


@njit(**_PAR)
def _planes_affine(x, y, mhi, a, bb, act, slope):
    n_, c_, l_ = x.shape
    for p in prange(n_ * c_):
        n = p // c_
        c = p - n * c_
        xr = x[n, c]
        yr = y[n, c]
        m = mhi[c]
        aa = a[c]
        b0 = bb[c]
        zero = m - m
        sl = x.dtype.type(slope)
        if act == ACT_NONE:
            for i in range(l_):
                yr[i] = (xr[i] - m) * aa + b0
        elif act == ACT_RELU:
            for i in range(l_):
                z = (xr[i] - m) * aa + b0
                yr[i] = zero if z < zero else z
        else:
            for i in range(l_):
                z = (xr[i] - m) * aa + b0
                yr[i] = z * sl if z < zero else z


@njit(**_PAR)
def _rows_affine(x, y, mhi, a, bb, act, slope, nchunk):
    r_, c_ = x.shape
    sl = x.dtype.type(slope)
    for k in prange(nchunk):
        r0 = k * r_ // nchunk
        r1 = (k + 1) * r_ // nchunk
        for r in range(r0, r1):
            xr = x[r]
            yr = y[r]
            if act == ACT_NONE:
                for c in range(c_):
                    yr[c] = (xr[c] - mhi[c]) * a[c] + bb[c]
            elif act == ACT_RELU:
                for c in range(c_):
                    z = (xr[c] - mhi[c]) * a[c] + bb[c]
                    yr[c] = 0 if z < 0 else z
            else:
                for c in range(c_):
                    z = (xr[c] - mhi[c]) * a[c] + bb[c]
                    yr[c] = z * sl if z < 0 else z


# ====================================================================== backward (Section 3)
# u is what the backward reads per value: x − μ_hi (modes SAVED_X, SAVED_X_ACT) or the
# pre-activation z recovered from y (SAVED_Y); x̂ = p·u + q per channel. dz is dy, or dy·slope
# where z ≤ 0 (z recomputed from x: ReLU has slope 0) or y < 0 (leaky ReLU from its output).
@njit(inline="always")
def _dz_u(mode, gv, sv, m, aa, b0, sl, isl):
    """(dz, u) of one value in an activation mode (the docstring comment above)."""
    if mode == SAVED_Y:
        if sv < 0:
            return gv * sl, sv * isl
        return gv, sv
    u = sv - m
    if mode == SAVED_X_ACT and not (u * aa + b0 > 0):
        return gv * sl, u
    return gv, u


@njit(inline="always")
def _slopes(s, slope):
    """(slope, 1/slope) in s's dtype; 1/slope is 0 for ReLU (slope 0, never inverted)."""
    return s.dtype.type(slope), s.dtype.type(1.0 / slope if slope != 0.0 else 0.0)


@njit(**_RED)
def _planes_bwd_reduce(dy, s, mode, mhi, a, bb, slope, bs, p1, p2, p3):
    n_, c_, l_ = s.shape
    nb = (l_ + bs - 1) // bs
    for it in prange(n_ * c_ * nb):
        n, c, lo, hi = _block(it, nb, c_, bs, l_)
        sr = s[n, c, lo:hi]  # slices indexed from 0 (see _planes_stats)
        gr = dy[n, c, lo:hi]
        m = mhi[c]
        zero = m - m
        s1 = zero
        s2 = zero
        s3 = zero
        if mode == SAVED_X:
            for i in range(hi - lo):
                u = sr[i] - m
                s1 += gr[i]  # Σ dL/dy_i
                s2 += gr[i] * u  # Σ dL/dy_i (x_i − μ_hi)
                s3 += u  # Σ (x_i − μ_hi): re-centres on the exact μ_B (the saved one is rounded)
        else:  # through the activation (see _dz_u)
            aa, b0 = a[c], bb[c]
            sl, isl = _slopes(s, slope)
            for i in range(hi - lo):
                g, u = _dz_u(mode, gr[i], sr[i], m, aa, b0, sl, isl)
                s1 += g
                s2 += g * u
                s3 += u
        p1[it] = s1
        p2[it] = s2
        p3[it] = s3


@njit(**_SER_MERGE)
def _planes_sum(p1, p2, p3, n_, c_, nb, s1, s2, s3):
    for c in range(c_):
        t1 = 0.0
        t2 = 0.0
        t3 = 0.0
        for n in range(n_):
            base = (n * c_ + c) * nb
            for b in range(nb):
                t1 += p1[base + b]
                t2 += p2[base + b]
                t3 += p3[base + b]
        s1[c] = t1
        s2[c] = t2
        s3[c] = t3


@njit(inline="always")
def _dx_plane(gr, sr, out, mode, m, aa, b0, sl, isl, A, B, K):
    """dL/dx over one plane of one channel (the parallel and the serial kernels share it)."""
    if mode == SAVED_X:
        for i in range(sr.shape[0]):
            out[i] = A * gr[i] + B * (sr[i] - m) + K  # dL/dx_i, Section 3 collapsed
    else:
        for i in range(sr.shape[0]):
            g, u = _dz_u(mode, gr[i], sr[i], m, aa, b0, sl, isl)
            out[i] = A * g + B * u + K


@njit(inline="always")
def _dx_row(gr, sr, out, mode, mhi, a, bb, sl, isl, ka, kb, kc):
    """dL/dx over one row of C channels (the parallel and the serial kernels share it)."""
    if mode == SAVED_X:
        for c in range(sr.shape[0]):
            out[c] = ka[c] * gr[c] + kb[c] * (sr[c] - mhi[c]) + kc[c]
    else:
        for c in range(sr.shape[0]):
            g, u = _dz_u(mode, gr[c], sr[c], mhi[c], a[c], bb[c], sl, isl)
            out[c] = ka[c] * g + kb[c] * u + kc[c]


@njit(**_PAR)
def _planes_bwd_dx(dy, s, dx, mode, mhi, a, bb, slope, ka, kb, kc):
    n_, c_, l_ = s.shape
    sl, isl = _slopes(s, slope)
    for p in prange(n_ * c_):
        n = p // c_
        c = p - n * c_
        _dx_plane(dy[n, c], s[n, c], dx[n, c], mode, mhi[c], a[c], bb[c], sl, isl,
                  ka[c], kb[c], kc[c])


@njit(**_RED)
def _rows_bwd_reduce(dy, s, mode, mhi, a, bb, slope, nchunk, sub, p1, p2, p3):
    r_, c_ = s.shape
    for k in prange(nchunk):
        r0 = k * r_ // nchunk
        r1 = (k + 1) * r_ // nchunk
        t1 = np.empty(c_, s.dtype)
        t2 = np.empty(c_, s.dtype)
        t3 = np.empty(c_, s.dtype)
        sl, isl = _slopes(s, slope)
        for c in range(c_):
            p1[k, c] = 0.0
            p2[k, c] = 0.0
            p3[k, c] = 0.0
        for rs in range(r0, r1, sub):
            re = min(rs + sub, r1)
            for c in range(c_):
                t1[c] = 0
                t2[c] = 0
                t3[c] = 0
            r = rs
            if mode == SAVED_X:  # plain BN: two rows per sweep, half the accumulator traffic
                while r + 2 <= re:
                    s0, s1_, g0, g1 = s[r], s[r + 1], dy[r], dy[r + 1]
                    for c in range(c_):
                        m = mhi[c]
                        u0 = s0[c] - m
                        u1 = s1_[c] - m
                        t1[c] += g0[c] + g1[c]
                        t2[c] += g0[c] * u0 + g1[c] * u1
                        t3[c] += u0 + u1
                    r += 2
            for rr in range(r, re):
                sr = s[rr]
                gr = dy[rr]
                if mode == SAVED_X:
                    for c in range(c_):
                        u = sr[c] - mhi[c]
                        t1[c] += gr[c]
                        t2[c] += gr[c] * u
                        t3[c] += u
                else:  # through the activation (see _dz_u)
                    for c in range(c_):
                        g, u = _dz_u(mode, gr[c], sr[c], mhi[c], a[c], bb[c], sl, isl)
                        t1[c] += g
                        t2[c] += g * u
                        t3[c] += u
            for c in range(c_):  # flush float32 sub-block sums into float64
                p1[k, c] += t1[c]
                p2[k, c] += t2[c]
                p3[k, c] += t3[c]


@njit(**_SER_MERGE)
def _rows_sum(p1, p2, p3, s1, s2, s3):
    nchunk, c_ = p1.shape
    for c in range(c_):
        t1 = 0.0
        t2 = 0.0
        t3 = 0.0
        for k in range(nchunk):
            t1 += p1[k, c]
            t2 += p2[k, c]
            t3 += p3[k, c]
        s1[c] = t1
        s2[c] = t2
        s3[c] = t3


@njit(**_PAR)
def _rows_bwd_dx(dy, s, dx, mode, mhi, a, bb, slope, ka, kb, kc, nchunk):
    r_, c_ = s.shape
    sl, isl = _slopes(s, slope)
    for k in prange(nchunk):
        r0 = k * r_ // nchunk
        r1 = (k + 1) * r_ // nchunk
        for r in range(r0, r1):
            _dx_row(dy[r], s[r], dx[r], mode, mhi, a, bb, sl, isl, ka, kb, kc)


@njit(**_SER)
def _bwd_coef(s1, s2, s3, mode, var, w, b, eps, m, ka, kb, kc, dgamma):
    """Per channel: dγ = Σdz·x̂, and dx = A·dz + B·u + K from Section 3's equations.

    With x̂ = p·u + q: dx = γ/σ·(dz − Σdz/m − x̂·Σdz·x̂/m) (σ = sqrt(σ²_B + ε)).
    """
    for c in range(s1.shape[0]):
        invstd = 1.0 / math.sqrt(var[c] + eps)
        if mode == SAVED_Y:  # u = z = γ x̂ + β
            p = 1.0 / w[c]
            q = -b[c] / w[c]
        else:  # u = x − μ_hi, x̂ = (u − mean(u))/σ
            p = invstd
            q = -(s3[c] / m) * invstd
        dg = p * s2[c] + q * s1[c]  # dL/dγ = Σ dL/dy_i · x̂_i
        A = w[c] * invstd
        K = -A * dg / m
        dgamma[c] = dg
        ka[c] = A
        kb[c] = K * p
        kc[c] = -A * s1[c] / m + K * q


# ====================================================================== small tensors: one serial call
# Below _SERIAL_BELOW values, waking the thread pool and dispatching five kernels costs more than
# the work; these do statistics + normalize (or reduce + dx) in one call on one thread, in float64
# accumulators, over a (outer, C, inner) view: planes (N, C, L) or rows (R, C, 1).
# Each pass below is written twice, for (R, C) rows (inner loop over the contiguous channels) and
# (N, C, L) planes (inner loop over one channel's plane); numba picks by the array's rank, and
# the mode branch sits outside the inner loop so that loop vectorizes. Only the two reductions
# are compiled with "reassoc" (as _planes_stats): on the affine passes it could fold μ_hi into b.
def _sums(x, sh, s, q):  # noqa: ARG001  (typed by the overload below)
    raise NotImplementedError


@overload(_sums, jit_options={"fastmath": _FM_RED})  # reassoc: the sums vectorize
def _sums_impl(x, sh, s, q):
    if x.ndim == 2:
        def rows(x, sh, s, q):
            for c in range(x.shape[1]):
                sh[c] = x[0, c]
            for o in range(x.shape[0]):
                xr = x[o]
                for c in range(xr.shape[0]):
                    d = np.float64(xr[c]) - sh[c]
                    s[c] += d
                    q[c] += d * d
        return rows

    def planes(x, sh, s, q):
        for c in range(x.shape[1]):
            sh[c] = x[0, c, 0]
        for o in range(x.shape[0]):
            for c in range(x.shape[1]):
                xr = x[o, c]
                m = sh[c]
                t = 0.0
                u = 0.0
                for i in range(xr.shape[0]):
                    d = np.float64(xr[i]) - m
                    t += d
                    u += d * d
                s[c] += t
                q[c] += u
    return planes


def _affine_act(x, y, mhi, a, bb, act, sl):  # noqa: ARG001
    raise NotImplementedError


@overload(_affine_act, inline="always")
def _affine_act_impl(x, y, mhi, a, bb, act, sl):
    if x.ndim == 2:
        def rows(x, y, mhi, a, bb, act, sl):
            for o in range(x.shape[0]):
                xr = x[o]
                yr = y[o]
                for c in range(xr.shape[0]):
                    z = (xr[c] - mhi[c]) * a[c] + bb[c]
                    if act != ACT_NONE and z < 0:
                        z = z * sl if act == ACT_LEAKY else z - z
                    yr[c] = z
        return rows

    def planes(x, y, mhi, a, bb, act, sl):
        for o in range(x.shape[0]):
            for c in range(x.shape[1]):
                xr = x[o, c]
                yr = y[o, c]
                m = mhi[c]
                aa = a[c]
                b0 = bb[c]
                for i in range(xr.shape[0]):
                    z = (xr[i] - m) * aa + b0
                    if act != ACT_NONE and z < 0:
                        z = z * sl if act == ACT_LEAKY else z - z
                    yr[i] = z
    return planes


@njit(**_SER)
def _small_forward(x, w, b, eps, act, slope, y, mean, var, mhi, a, bb):
    """Statistics + normalize on one thread; x is (R, C) rows or (N, C, L) planes."""
    c_ = x.shape[1]
    s = np.zeros(c_)
    q = np.zeros(c_)
    sh = np.empty(c_)
    _sums(x, sh, s, q)
    m = np.float64(x.size // c_)
    for c in range(c_):
        dm = s[c] / m
        mean[c] = sh[c] + dm  # μ_B
        var[c] = max((q[c] - s[c] * dm) / m, 0.0)  # σ²_B from shifted sums
    _affine_coef(mean, var, w, b, eps, mhi, a, bb)
    _affine_act(x, y, mhi, a, bb, act, x.dtype.type(slope))


def _bwd_sums(dy, sv, mode, mhi, a, bb, sl, isl, s1, s2, s3):  # noqa: ARG001
    raise NotImplementedError


@overload(_bwd_sums, jit_options={"fastmath": _FM_RED})
def _bwd_sums_impl(dy, sv, mode, mhi, a, bb, sl, isl, s1, s2, s3):
    if sv.ndim == 2:
        def rows(dy, sv, mode, mhi, a, bb, sl, isl, s1, s2, s3):
            for o in range(sv.shape[0]):
                gr = dy[o]
                sr = sv[o]
                if mode == SAVED_X:
                    for c in range(sr.shape[0]):
                        u = sr[c] - mhi[c]
                        s1[c] += gr[c]
                        s2[c] += gr[c] * np.float64(u)
                        s3[c] += u
                else:
                    for c in range(sr.shape[0]):
                        g, u = _dz_u(mode, gr[c], sr[c], mhi[c], a[c], bb[c], sl, isl)
                        s1[c] += g
                        s2[c] += g * np.float64(u)
                        s3[c] += u
        return rows

    def planes(dy, sv, mode, mhi, a, bb, sl, isl, s1, s2, s3):
        for o in range(sv.shape[0]):
            for c in range(sv.shape[1]):
                gr = dy[o, c]
                sr = sv[o, c]
                m = mhi[c]
                t1 = 0.0
                t2 = 0.0
                t3 = 0.0
                if mode == SAVED_X:
                    for i in range(sr.shape[0]):
                        u = sr[i] - m
                        t1 += gr[i]
                        t2 += gr[i] * np.float64(u)
                        t3 += u
                else:
                    for i in range(sr.shape[0]):
                        g, u = _dz_u(mode, gr[i], sr[i], m, a[c], bb[c], sl, isl)
                        t1 += g
                        t2 += g * np.float64(u)
                        t3 += u
                s1[c] += t1
                s2[c] += t2
                s3[c] += t3
    return planes


def _bwd_dx(dy, sv, dx, mode, mhi, a, bb, sl, isl, ka, kb, kc):  # noqa: ARG001
    raise NotImplementedError


@overload(_bwd_dx, inline="always")
def _bwd_dx_impl(dy, sv, dx, mode, mhi, a, bb, sl, isl, ka, kb, kc):
    if sv.ndim == 2:
        def rows(dy, sv, dx, mode, mhi, a, bb, sl, isl, ka, kb, kc):
            for o in range(sv.shape[0]):
                _dx_row(dy[o], sv[o], dx[o], mode, mhi, a, bb, sl, isl, ka, kb, kc)
        return rows

    def planes(dy, sv, dx, mode, mhi, a, bb, sl, isl, ka, kb, kc):
        for o in range(sv.shape[0]):
            for c in range(sv.shape[1]):
                _dx_plane(dy[o, c], sv[o, c], dx[o, c], mode, mhi[c], a[c], bb[c], sl, isl,
                          ka[c], kb[c], kc[c])
    return planes


@njit(**_SER)
def _small_backward(dy, sv, mode, mean, var, w, b, eps, slope, dx, dgamma, s1):
    """Both reductions, then dx, on one thread; arrays are (R, C) rows or (N, C, L) planes."""
    c_ = sv.shape[1]
    dt = sv.dtype
    mhi, a, bb = np.empty(c_, dt), np.empty(c_, dt), np.empty(c_, dt)
    _affine_coef(mean, var, w, b, eps, mhi, a, bb)
    s2 = np.zeros(c_)
    s3 = np.zeros(c_)
    s1[:] = 0.0
    sl, isl = _slopes(sv, slope)
    _bwd_sums(dy, sv, mode, mhi, a, bb, sl, isl, s1, s2, s3)
    ka, kb, kc = np.empty(c_, dt), np.empty(c_, dt), np.empty(c_, dt)
    _bwd_coef(s1, s2, s3, mode, var, w, b, eps, np.float64(sv.size // c_), ka, kb, kc, dgamma)
    _bwd_dx(dy, sv, dx, mode, mhi, a, bb, sl, isl, ka, kb, kc)


# ====================================================================== torch-facing wrappers
def supports(x: Tensor) -> bool:
    """float32/float64/bfloat16 CPU tensors of rank 2–5, contiguous or channels_last, non-empty."""
    return (
        x.device.type == "cpu"
        and x.dtype in _DTYPES
        and 2 <= x.dim() <= 5
        and x.numel() > 0
        and _layout(x) is not None
    )


def _layout(x: Tensor) -> str | None:
    if x.is_contiguous():
        return "rows" if x.numel() == x.shape[0] * x.shape[1] else "planes"
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "rows"
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return "rows"
    return None


def _view(t: Tensor, layout: str) -> np.ndarray:
    """Zero-copy numpy view: (N, C, L) planes or (R, C) rows."""
    n, c = t.shape[0], t.shape[1]
    if layout == "planes":
        return t.detach().view(n, c, -1).numpy()
    if t.is_contiguous():
        return t.detach().view(n, c).numpy()
    perm = (0, *range(2, t.dim()), 1)
    return t.detach().permute(perm).view(-1, c).numpy()


def _like(x: Tensor, t: Tensor) -> Tensor:
    """t in x's memory format (a no-op when it already is)."""
    if x.is_contiguous():
        return t.contiguous()
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return t.contiguous(memory_format=fmt)


def _chunks(rows: int) -> int:
    return max(1, min(rows, 4 * numba.get_num_threads()))


def _sub_rows(c: int) -> int:
    """Rows per sub-block: ≤ _SUB values in cache, and ≤ 256 float32 terms per running sum."""
    return 256


def _f64(t: Tensor | None, c: int, fill: float) -> np.ndarray:
    if t is None:
        return np.full(c, fill)
    t = t.detach()
    return (t if t.dtype in _NATIVE else t.float()).numpy().astype(np.float64)


def _stats(xa: np.ndarray, layout: str) -> tuple[np.ndarray, np.ndarray]:
    c = xa.shape[1]
    mean, var = np.empty(c), np.empty(c)
    if layout == "planes":
        n, _, l_ = xa.shape
        bs = min(_BLOCK, l_)
        nb = (l_ + bs - 1) // bs
        items = n * c * nb
        pmean, pm2, pcnt = np.empty(items), np.empty(items), np.empty(items)
        _planes_stats(xa, bs, pmean, pm2, pcnt)
        _planes_merge(pmean, pm2, pcnt, n, c, nb, mean, var)
    else:
        r = xa.shape[0]
        k = _chunks(r)
        pmean, pm2, pcnt = np.empty((k, c)), np.empty((k, c)), np.empty(k)
        _rows_stats(xa, k, _sub_rows(c), pmean, pm2, pcnt)
        _rows_merge(pmean, pm2, pcnt, mean, var)
    return mean, var


def _apply(xa, ya, layout, mhi, a, bb, act, slope) -> None:
    if layout == "planes":
        _planes_affine(xa, ya, mhi, a, bb, act, slope)
    else:
        _rows_affine(xa, ya, mhi, a, bb, act, slope, _chunks(xa.shape[0]))


def _native(x: Tensor) -> Tensor:
    return x if x.dtype in _NATIVE else x.float()  # bfloat16 → float32 (keeps the memory format)


def _np_dtype(x: Tensor):
    return np.float64 if x.dtype == torch.float64 else np.float32


def forward_act(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: int, slope: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training forward with a fused activation: (act(γ x̂ + β), μ_B, σ²_B biased in float64)."""
    xn = _native(x)
    layout = _layout(xn)
    xa = _view(xn, layout)
    c = xa.shape[1]
    dt = _np_dtype(xn)
    mhi, a, bb = np.empty(c, dt), np.empty(c, dt), np.empty(c, dt)
    w64, b64 = _f64(weight, c, 1.0), _f64(bias, c, 0.0)
    y = buffers.empty_like(xn)
    ya = _view(y, layout)
    if xa.size < _SERIAL_BELOW:
        mean, var = np.empty(c), np.empty(c)
        _small_forward(xa, w64, b64, float(eps), act, float(slope), ya, mean, var, mhi, a, bb)
    else:
        mean, var = _stats(xa, layout)
        _affine_coef(mean, var, w64, b64, float(eps), mhi, a, bb)
        _apply(xa, ya, layout, mhi, a, bb, act, float(slope))
    return as_dtype(y, x.dtype), torch.from_numpy(mean), torch.from_numpy(var)


def forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Algorithm 1 on a training batch: (y, μ_B, σ²_B biased), y in x's dtype and memory format."""
    y, mean, var = forward_act(x, weight, bias, eps, ACT_NONE, 0.0)
    sd = acc_dtype(x.dtype)
    return y, mean.to(sd), var.to(sd)


def eval_forward(
    x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None,
    bias: Tensor | None, eps: float, act: int = ACT_NONE, slope: float = 0.0,
) -> Tensor:
    """Inference: one fused pass y = act((x − E[x])·γ/sqrt(Var[x]+ε) + β) (Algorithm 2)."""
    xn = _native(x)
    layout = _layout(xn)
    xa = _view(xn, layout)
    c = xa.shape[1]
    dt = _np_dtype(xn)
    mhi, a, bb = np.empty(c, dt), np.empty(c, dt), np.empty(c, dt)
    _affine_coef(
        _f64(running_mean, c, 0.0), _f64(running_var, c, 1.0), _f64(weight, c, 1.0),
        _f64(bias, c, 0.0), float(eps), mhi, a, bb,
    )
    y = buffers.empty_like(xn)
    _apply(xa, _view(y, layout), layout, mhi, a, bb, act, float(slope))
    return as_dtype(y, x.dtype)


def backward_act(
    dy: Tensor, saved: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
    bias: Tensor | None, eps: float, mode: int, slope: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dL/dx, dL/dγ, dL/dβ) from x (mode SAVED_X / SAVED_X_ACT) or from y (SAVED_Y)."""
    sn = _native(saved)
    layout = _layout(sn)
    dyn = _like(sn, _native(dy))
    sa, ga = _view(sn, layout), _view(dyn, layout)
    c = sa.shape[1]
    dt = _np_dtype(sn)
    mean64, var64 = _f64(mean, c, 0.0), _f64(var, c, 1.0)
    w64, b64 = _f64(weight, c, 1.0), _f64(bias, c, 0.0)
    if sa.size < _SERIAL_BELOW:
        dx = buffers.empty_like(sn)
        dgamma, s1 = np.empty(c), np.empty(c)
        _small_backward(
            ga, sa, mode, mean64, var64, w64, b64, float(eps), float(slope),
            _view(dx, layout), dgamma, s1,
        )
        return _grads_out(dx, dgamma, s1, saved, weight)
    mhi, a, bb = np.empty(c, dt), np.empty(c, dt), np.empty(c, dt)
    _affine_coef(mean64, var64, w64, b64, float(eps), mhi, a, bb)
    s1, s2, s3 = np.empty(c), np.empty(c), np.empty(c)
    if layout == "planes":
        n, _, l_ = sa.shape
        bs = min(_BLOCK, l_)
        nb = (l_ + bs - 1) // bs
        p1, p2, p3 = np.empty(n * c * nb), np.empty(n * c * nb), np.empty(n * c * nb)
        _planes_bwd_reduce(ga, sa, mode, mhi, a, bb, float(slope), bs, p1, p2, p3)
        _planes_sum(p1, p2, p3, n, c, nb, s1, s2, s3)
    else:
        k = _chunks(sa.shape[0])
        p1, p2, p3 = np.empty((k, c)), np.empty((k, c)), np.empty((k, c))
        _rows_bwd_reduce(ga, sa, mode, mhi, a, bb, float(slope), k, _sub_rows(c), p1, p2, p3)
        _rows_sum(p1, p2, p3, s1, s2, s3)
    m = sa.size // c
    ka, kb, kc = np.empty(c, dt), np.empty(c, dt), np.empty(c, dt)
    dgamma = np.empty(c)
    _bwd_coef(s1, s2, s3, mode, var64, w64, b64, float(eps), float(m), ka, kb, kc, dgamma)
    dx = buffers.empty_like(sn)
    dxa = _view(dx, layout)
    if layout == "planes":
        _planes_bwd_dx(ga, sa, dxa, mode, mhi, a, bb, float(slope), ka, kb, kc)
    else:
        _rows_bwd_dx(ga, sa, dxa, mode, mhi, a, bb, float(slope), ka, kb, kc, _chunks(sa.shape[0]))
    return _grads_out(dx, dgamma, s1, saved, weight)


def _grads_out(dx, dgamma, dbeta, saved, weight):
    """dx in the input's dtype; dγ, dβ in γ's dtype (reference.backward's contract), else acc."""
    dt = weight.dtype if weight is not None else acc_dtype(saved.dtype)
    return as_dtype(dx, saved.dtype), as_dtype(torch.from_numpy(dgamma), dt), as_dtype(torch.from_numpy(dbeta), dt)


@njit(**_SER)
def _ema(mean, var, rm, rv, factor, corr):
    for c in range(mean.shape[0]):
        rm[c] += factor * (mean[c] - rm[c])  # running ← running + momentum·(μ_B − running)
        rv[c] += factor * (var[c] * corr - rv[c])  # with the unbiased m/(m−1)·σ²_B


def update_running_stats(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, m: int, factor: float
) -> bool:
    """The EMA step in one compiled call; False (nothing touched) when a tensor is not a plain
    contiguous float32/float64 CPU tensor, so the caller uses torch ops instead."""
    ts = (running_mean, running_var, mean, var)
    if not all(t.device.type == "cpu" and t.dtype in _NATIVE and t.is_contiguous() for t in ts):
        return False
    if running_mean.requires_grad or running_var.requires_grad:
        return False
    _ema(mean.detach().numpy(), var.detach().numpy(), running_mean.numpy(), running_var.numpy(),
         float(factor), m / (m - 1.0))
    return True


def backward(
    dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Section 3's chain rule: (dL/dx, dL/dγ, dL/dβ); dγ, dβ in float32 (float64 for float64 x)."""
    return backward_act(dy, x, mean, var, weight, None, eps, SAVED_X, 1.0)
