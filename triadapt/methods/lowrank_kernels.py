"""The autograd kernels of the adapted linear layer: y = x Wᵀ + b + scale · core(x_d Aᵀ) Bᵀ.

:class:`_LowRankLinear` is the frozen base and the adapter as one autograd node in factored form;
:class:`_FoldedLowRankLinear` folds the adapter into the weight when the activations outweigh it
(:func:`fold_pays`). Both are the same map; only the rounding differs.
"""

from __future__ import annotations

import torch


def _apply_core(h: torch.Tensor, core: torch.Tensor | None, kind: str) -> torch.Tensor:
    """u = core(h) for rows h (N×r)."""
    if kind == "identity":
        return h
    return h * core if kind == "diagonal" else torch.mm(h, core.t())


def _lowrank_forward(x, xd, weight, bias, a, b, core, kind, scale):
    """out = x Wᵀ + b + scale · core(x_d Aᵀ) Bᵀ on 2-D x; returns (out, h, u) with h = x_d Aᵀ, u = core(h)."""
    out = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
    h = torch.mm(x if xd is None else xd, a.t())
    u = _apply_core(h, core, kind)
    out.addmm_(u, b.t(), alpha=scale)  # the scale rides on BLAS' alpha: no N×d_out temporary
    return out, h, u


class _LowRankLinear(torch.autograd.Function):
    """The frozen base and the adapter of one :class:`AdaptedLinear` as a single autograd node.

    Backward, with g = ∂L/∂out (N×d_out) and ĝ = ∂L/∂h (N×r):
    ∂B = s·(uᵀg)ᵀ (computed as r×d_out: the fast layout), ∂u = s·g B, ∂core from ∂u and h,
    ∂A = ĝᵀ x_d, and ∂x = g W + ĝ A as one GEMM plus an in-place rank-r update when the adapter sees
    x itself (no dropout): no second N×d_in gradient, no sum of two.
    """

    @staticmethod
    def forward(ctx, x, xd, weight, bias, a, b, core, kind, scale):
        out, h, u = _lowrank_forward(x, xd, weight, bias, a, b, core, kind, scale)
        keep_x = xd is None or weight.requires_grad
        ctx.save_for_backward(x if keep_x else None, xd, weight, a, b, core, h if kind != "identity" else None, u)
        ctx.kind, ctx.scale = kind, scale
        return out

    @staticmethod
    def backward(ctx, g):
        x, xd, weight, a, b, core, h, u = ctx.saved_tensors
        kind, s = ctx.kind, ctx.scale
        need_x, need_xd, need_w, need_bias, need_a, need_b, need_core = ctx.needs_input_grad[:7]
        g = g.contiguous()
        gb = torch.mm(u.t(), g).mul_(s).t() if need_b else None
        gu = torch.mm(g, b).mul_(s)
        gcore = None
        if kind == "identity":
            gh = gu
        elif kind == "diagonal":
            gcore = (gu * h).sum(0) if need_core else None
            gh = gu * core
        else:
            gcore = torch.mm(gu.t(), h) if need_core else None
            gh = torch.mm(gu, core)
        src = x if xd is None else xd
        ga = torch.mm(gh.t(), src) if need_a else None
        gx = gxd = None
        if need_x:
            gx = torch.mm(g, weight)
            if xd is None:
                gx.addmm_(gh, a)
        if need_xd:
            gxd = torch.mm(gh, a)
        gw = torch.mm(g.t(), x) if need_w else None
        gbias = g.sum(0) if need_bias else None
        return gx, gxd, gw, gbias, ga, gb, gcore, None, None


def _folded_weight(weight, a, b, core, kind, scale) -> torch.Tensor:
    """W + scale · B · core · A (d_out×d_in): the adapter folded into the frozen weight."""
    bc = b if kind == "identity" else (b * core if kind == "diagonal" else torch.mm(b, core))
    return torch.addmm(weight, bc, a, alpha=scale)


#: rows per block when the factor gradients are accumulated block by block (see _FoldedLowRankLinear)
FOLD_BLOCK_ROWS = 1024


def fold_pays(n_rows: int, d_in: int, d_out: int) -> bool:
    """Folding costs two weight-sized passes, the factored form two activation-sized ones (N×d_out
    out and N×d_in ∂x updates): fold when the activations outweigh the weight twice over."""
    return n_rows * (d_in + d_out) >= 2 * d_in * d_out


class _FoldedLowRankLinear(torch.autograd.Function):
    """y = x (W + s·B·core·A)ᵀ + b for an adapter that sees x itself (no dropout).

    The adapter is folded into the frozen weight (a d_out×d_in sum, cheap next to an activation
    of batch·sequence rows): the forward is one GEMM, ∂x = g (W + s·B·core·A) is one GEMM, and no
    activation-sized adapter pass remains in either. The factor gradients stay factored:
    h = x Aᵀ is recomputed in backward and ∂B = s·(uᵀg)ᵀ, ∂core, ∂A = ĝᵀ x are accumulated block
    by block of rows, so that each block of x and g is read from memory once for its two products.
    Mathematically the same map as :class:`_LowRankLinear`; only the rounding differs.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, core, kind, scale):
        w = _folded_weight(weight, a, b, core, kind, scale)
        out = torch.addmm(bias, x, w.t()) if bias is not None else torch.mm(x, w.t())
        ctx.save_for_backward(x, weight, a, b, core)
        ctx.kind, ctx.scale = kind, scale
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight, a, b, core = ctx.saved_tensors
        kind, s = ctx.kind, ctx.scale
        need_x, need_w, need_bias, need_a, need_b, need_core = ctx.needs_input_grad[:6]
        g = g.contiguous()
        gx = torch.mm(g, _folded_weight(weight, a, b, core, kind, s)) if need_x else None
        gw = torch.mm(g.t(), x) if need_w else None
        gbias = g.sum(0) if need_bias else None
        ga = gb = gcore = None
        if need_a or need_b or need_core:
            r = a.shape[0]
            gbt = g.new_zeros(r, g.shape[1])  # ∂Bᵀ / s
            ga = a.new_zeros(a.shape)  # ∂A / s
            gcore = None if kind == "identity" else core.new_zeros(core.shape)  # ∂core / s
            at = a.t()
            for r0 in range(0, x.shape[0], FOLD_BLOCK_ROWS):
                xb, gblk = x[r0 : r0 + FOLD_BLOCK_ROWS], g[r0 : r0 + FOLD_BLOCK_ROWS]
                h = torch.mm(xb, at)
                gbt.addmm_(_apply_core(h, core, kind).t(), gblk)
                gu = torch.mm(gblk, b)
                if kind == "identity":
                    gh = gu
                elif kind == "diagonal":
                    gcore.add_((gu * h).sum(0))
                    gh = gu * core
                else:
                    gcore.addmm_(gu.t(), h)
                    gh = torch.mm(gu, core)
                ga.addmm_(gh.t(), xb)
            gb = gbt.mul_(s).t() if need_b else None
            ga = ga.mul_(s) if need_a else None
            gcore = gcore.mul_(s) if need_core and gcore is not None else None
        return gx, gw, gbias, ga, gb, gcore, None, None


def _fusable(x, w, a, b, core, bias) -> bool:
    """The fused node needs one dtype throughout and no autocast (which would change dtypes inside)."""
    if x.dim() == 0 or torch.is_autocast_enabled(x.device.type):
        return False
    dt = x.dtype
    return (w.dtype == a.dtype == b.dtype == dt and (bias is None or bias.dtype == dt)
            and (core is None or core.dtype == dt))
