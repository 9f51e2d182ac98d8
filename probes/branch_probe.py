"""The fit of a candidate-conditioned probe: a conditional logit over each fork's candidates.

Softmax over a fork's candidates, mean negative log-likelihood, L2 penalty on unit-scaled
features; strictly convex, so full-batch L-BFGS in float64 from ``w = 0`` finds its unique
optimum with no randomness. See :mod:`probes.linear` for what the probes read and report.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from training.errors import UsageError

L2 = 1e-2
"""L2 penalty on the mean log-likelihood, with unit-scaled features. On the default run's final
checkpoint, held-out accuracy averaged over the kind x layer x target cells moved by at most 0.016
between 1e-4 and 1e-2 (0.003 from 500 probe-split forks per kind up), and 1e-2 converges fastest; the
penalty also keeps the optimum finite where a target is separable (``taken`` at the last layer)."""

MAX_ITER = 500
"""L-BFGS iterations at most per batch of fits."""

TOL = 1e-6
"""Convergence: every fit's gradient below this (max-norm; the loss is a mean over forks). On the
default run, 1e-4 to 1e-7 give the same predictions on every tested fork; 1e-6 takes ~25 iterations."""


@dataclass(frozen=True)
class BranchProbe:
    """A fitted candidate-conditioned probe: ``scores(x) = (x / scale) @ w`` per branch."""

    w: np.ndarray
    scale: np.ndarray
    iterations: int

    def scores(self, x: Float[np.ndarray, "n branch feat"], mask: Bool[np.ndarray, "n branch"]) -> np.ndarray:
        return np.where(mask, (x * _inverse(self.scale)) @ self.w, -np.inf)

    def predict(self, x: Float[np.ndarray, "n branch feat"], mask: Bool[np.ndarray, "n branch"]) -> np.ndarray:
        return self.scores(x, mask).argmax(axis=1)  # ties go to the first branch in canonical order


def _scale(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per feature: the root-mean-square spread of ``x [..., n, branch, feat]`` around each fork's
    mean over its branches, ``[..., feat]`` (0 for a feature that never differs within a fork)."""
    m = mask[..., None]
    mean = (x * m).sum(axis=-2, keepdims=True) / m.sum(axis=-2, keepdims=True)
    dev = np.where(m, x - mean, 0.0)
    s = np.sqrt((dev**2).sum(axis=(-3, -2)) / max(int(mask.sum()), 1))
    top = s.max(axis=-1, keepdims=True, initial=0.0)
    return np.where(s > 1e-12 * np.maximum(top, 1e-300), s, 0.0)


def _inverse(scale: np.ndarray) -> np.ndarray:
    return np.where(scale > 0, 1.0 / np.where(scale > 0, scale, 1.0), 0.0)


def _solve(
    x: Float[Tensor, "G n branch feat"],
    mask: Bool[np.ndarray, "n branch"],
    Y: Int[np.ndarray, "T n"],
    l2: float,
    max_iter: int = MAX_ITER,
    tol: float = TOL,
    history: int = 10,
) -> tuple[Float[Tensor, "G T feat"], int]:
    """G x T independent conditional logits, one per (feature set g, label row t), solved together.

    Fit (g, t) minimises ``sum_i -log softmax_b(x[g, i] @ w)[Y[t, i]] / n_t + (l2 / 2) |w|^2`` over
    the items with ``Y[t, i] >= 0`` (``n_t`` of them). Batched L-BFGS in float64 from ``w = 0``, each
    fit with its own curvature pairs and Armijo backtracking step, until every fit's gradient is
    below ``tol`` (max-norm) or ``max_iter``; returns the weights and the iterations used.
    """
    G, n, B, D = x.shape
    T = Y.shape[0]
    xf = x.reshape(G, n * B, D)
    xt = xf.transpose(1, 2).contiguous()  # both products below then run on contiguous operands
    neg = torch.from_numpy(np.where(mask, 0.0, -np.inf))
    Yt = torch.from_numpy(np.asarray(Y, dtype=np.int64))
    wt = (Yt >= 0).double()
    cnt = wt.sum(1).clamp(min=1.0)
    Yc = Yt.clamp(min=0)  # branch 0 always exists; its term is weighted 0 where unlabelled
    target = torch.zeros(T, n, B, dtype=torch.float64)
    target.scatter_(2, Yc[:, :, None], 1.0)
    target *= (wt / cnt[:, None])[:, :, None]
    pick = Yc[None, :, :, None].expand(G, T, n, 1)
    scale = (wt / cnt[:, None])[None]

    def fg(W: Tensor) -> tuple[Tensor, Tensor]:
        s = torch.bmm(W, xt).reshape(G, T, n, B) + neg
        logp = s - torch.logsumexp(s, dim=3, keepdim=True)
        f = -(logp.gather(3, pick)[..., 0] * scale).sum(2) + 0.5 * l2 * (W * W).sum(2)
        r = torch.exp(logp) * scale[..., None] - target
        return f, torch.bmm(r.reshape(G, T, n * B), xf) + l2 * W

    W = torch.zeros(G, T, D, dtype=torch.float64)
    f, g = fg(W)
    S: list[Tensor] = []
    Yh: list[Tensor] = []
    rho: list[Tensor] = []
    it = 0
    for it in range(1, max_iter + 1):
        active = g.abs().amax(2) > tol
        if not bool(active.any()):
            it -= 1
            break
        q = g.clone()
        alphas = []
        for s_, y_, r_ in zip(reversed(S), reversed(Yh), reversed(rho)):
            a = r_ * (s_ * q).sum(2)
            q -= a[..., None] * y_
            alphas.append(a)
        if S:
            yy = (Yh[-1] * Yh[-1]).sum(2)
            gamma = torch.where(rho[-1] > 0, 1.0 / (rho[-1] * yy.clamp(min=1e-300)), 1.0)
        else:
            gamma = 1.0 / g.norm(dim=2).clamp(min=1e-300)  # a first step of length 1
        z = gamma[..., None] * q
        for s_, y_, r_, a in zip(S, Yh, rho, reversed(alphas)):
            b = r_ * (y_ * z).sum(2)
            z += (a - b)[..., None] * s_
        d = -z * active[..., None]
        dg = (d * g).sum(2)
        uphill = active & (dg >= 0)  # cannot happen for positive curvature pairs; a safeguard
        if bool(uphill.any()):
            d[uphill] = -g[uphill]
            dg = (d * g).sum(2)
        t = torch.ones(G, T, dtype=torch.float64)
        for _ in range(60):
            f_new, g_new = fg(W + t[..., None] * d)
            ok = (f_new <= f + 1e-4 * t * dg) | ~active
            if bool(ok.all()):
                break
            t = torch.where(ok, t, 0.5 * t)
        s_ = t[..., None] * d
        y_ = g_new - g
        sy = (s_ * y_).sum(2)
        S.append(s_)
        Yh.append(y_)
        rho.append(torch.where(sy > 1e-20, 1.0 / sy.clamp(min=1e-300), 0.0))  # a pair without curvature is a no-op
        if len(S) > history:
            S.pop(0), Yh.pop(0), rho.pop(0)
        W, f, g = W + s_, f_new, g_new
    return W, it


def fit_branch_probe(
    x: Float[np.ndarray, "n branch feat"],
    mask: Bool[np.ndarray, "n branch"],
    y: Int[np.ndarray, " n"],
    *,
    l2: float = L2,
    max_iter: int = MAX_ITER,
) -> BranchProbe:
    """Fit one probe: ``w`` of the conditional logit ``P(y | fork) = softmax_b(w . phi_b / scale)``.

    Minimises ``mean_i -log P(y_i) + (l2 / 2) |w|^2`` (features scaled to unit within-fork spread)
    by L-BFGS in float64 from ``w = 0``; the objective is strictly convex, so the result is its
    unique optimum (to the tolerance) and depends on nothing random.
    """
    if l2 <= 0:
        raise UsageError(f"l2={l2}: the penalty must be > 0 (a separable target has no finite optimum without it)")
    x = np.asarray(x, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    scale = _scale(x, mask)
    W, it = _solve(torch.from_numpy(x * _inverse(scale))[None], mask, np.asarray(y)[None], l2, max_iter)
    return BranchProbe(W[0, 0].numpy().copy(), scale, it)


def _fit_predict(x_tr: np.ndarray, m_tr: np.ndarray, Y_tr: np.ndarray, x_te: np.ndarray, m_te: np.ndarray,
                 l2: float) -> np.ndarray:
    """Predictions ``[layer, T, n_te]`` of the probes fit per layer and label row on the training forks."""
    scale = _scale(x_tr, m_tr)  # [layer, feat]
    inv = _inverse(scale)[:, None, None, :]
    W, _ = _solve(torch.from_numpy(x_tr * inv), m_tr, Y_tr, l2)
    s = torch.einsum("lnbd,ltd->ltnb", torch.from_numpy(x_te * inv), W).numpy()
    return np.where(m_te, s, -np.inf).argmax(axis=3)


# --------------------------------------------------------------------------- probing every layer
