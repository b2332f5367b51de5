"""MoEfication of a dense FFN: neurons clustered into experts, a router fitted to the clusters.

Copy-upcycling gives S identical experts and a near-uniform router, so importance, IB, tau and
alpha have nothing to tell apart (METHOD.md section 9). MoEfication (Zhang et al. 2022,
"MoEfication: Transformer Feed-forward Layers are Mixtures of Experts") splits the FFN's
neurons into S groups instead; each group is an expert, and a router predicts which groups
would fire. This module does that for the kit's :class:`~hfedmoe.models.moe.SparseMoE`:

1. **Clusters by co-activation.** The FFN runs on calibration tokens (real text, label-free);
   every neuron is described by its activation over those tokens, L2-normalised, and balanced
   k-means (equal sizes, a greedy capacity-constrained assignment) groups neurons that fire on
   the same tokens. Experts therefore differ, and specialise on kinds of tokens.
2. **Experts.** Expert s holds ``W1[C_s], b1[C_s]`` and ``top_k * W2[:, C_s]`` plus the output
   bias ``b2``: with the top-k weights normalised to sum to 1 (equal weights 1/k) the layer
   computes ``sum over the k chosen clusters of W2_s act(W1_s x + b1_s) + b2``, the dense FFN
   restricted to those clusters.
3. **Router.** A linear router fitted by least squares to predict each cluster's contribution
   to the output (``||W2_s act(W1_s x + b1_s)||``) from the FFN input, standardised and scaled
   by ``temperature``: top-k picks the clusters whose output would matter most.

Calibration runs layer by layer, so layer l's router is fitted on the hidden states the
MoEfied layers below it produce.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hfedmoe.experts import ACTIVATIONS
from hfedmoe.models.moe import SparseMoE, TopKRouter, bank_from_neuron_groups


def balanced_kmeans(features: torch.Tensor, k: int, iters: int = 15, seed: int = 0
                    ) -> torch.Tensor:
    """Assign each row of ``features`` (n, f) to one of ``k`` equal-size clusters.

    Cosine k-means whose assignment step lets rows choose in order of their best similarity,
    each taking its most similar cluster that still has room (``n / k`` rows per cluster). Returns (n,) cluster ids; deterministic for a seed.
    """
    n = features.shape[0]
    if n % k:
        raise ValueError(f"{n} rows do not split into {k} equal clusters")
    cap = n // k
    x = F.normalize(features.float(), dim=1)  # (n, f)
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=g)[:k]].clone()  # (k, f)
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        sim = x @ centroids.T  # (n, k)
        prefs = torch.argsort(sim, dim=1, descending=True).tolist()  # clusters by preference
        best = sim.max(dim=1).values
        owner = [-1] * n
        fill = [0] * k
        for i in torch.argsort(best, descending=True).tolist():  # surest rows choose first
            for c in prefs[i]:
                if fill[c] < cap:
                    owner[i] = c
                    fill[c] += 1
                    break
        assign = torch.tensor(owner, dtype=torch.long)
        onehot = F.one_hot(assign, k).to(x.dtype)  # (n, k)
        new = F.normalize(onehot.T @ x, dim=1)  # (k, f) cluster means, normalised
        if torch.allclose(new, centroids, atol=1e-6):
            break
        centroids = new
    return assign


def moefy_linear_pair(fc_in: nn.Linear, fc_out: nn.Linear, activation: str, num_experts: int,
                      top_k: int, calibration: torch.Tensor, temperature: float = 2.0,
                      seed: int = 0, impl: str = "grouped",
                      max_cluster_tokens: int = 2048) -> SparseMoE:
    """Split ``fc_out(act(fc_in(x)))`` into ``num_experts`` clustered experts with a fitted router.

    Args:
        fc_in, fc_out: the dense FFN's linears (d -> F, F -> d).
        activation: the FFN's activation name (``hfedmoe.experts``).
        num_experts: S; F must be divisible by it.
        top_k: experts per token.
        calibration: (tokens, d) FFN inputs from real text.
        temperature: std of the router logits over the calibration tokens.
        seed: k-means initialisation and the token sample it clusters on.
        impl: expert path.
        max_cluster_tokens: calibration tokens (a seeded sample) that describe each neuron.
    """
    d_ff = fc_in.out_features
    if d_ff % num_experts:
        raise ValueError(f"d_ff={d_ff} is not divisible by num_experts={num_experts}")
    act: Callable[[torch.Tensor], torch.Tensor] = ACTIVATIONS[activation]
    with torch.no_grad():
        x = calibration.float()  # (N, d)
        h = act(fc_in(x))  # (N, F)
        g = torch.Generator().manual_seed(seed)
        sample = torch.randperm(h.shape[0], generator=g)[:max_cluster_tokens]
        clusters = balanced_kmeans(h[sample].T, num_experts, seed=seed)  # (F,)
        members = [torch.nonzero(clusters == s).reshape(-1) for s in range(num_experts)]
        # each cluster's contribution to the output, per token: the router's target
        target = torch.stack([(h[:, m] @ fc_out.weight[:, m].T).norm(dim=1) for m in members],
                             dim=1)  # (N, S)
        target = (target - target.mean()) / target.std().clamp_min(1e-6) * temperature
        router_w = torch.linalg.lstsq(x.double(), target.double()).solution.T.float()  # (S, d)
    bank = bank_from_neuron_groups(fc_in, fc_out, activation, members, top_k, impl)
    router = TopKRouter(bank.shape.d_model, num_experts, top_k, "detached", init_std=0.0)
    with torch.no_grad():
        router.weight.copy_(router_w)
    return SparseMoE(router, bank)
