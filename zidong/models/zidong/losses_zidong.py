"""The objectives of `ZidongModel`: contrastive alignment with global negatives, multi-way matching, masking.

Contrastive loss across processes (gather-with-grad + local loss). Each rank scores only its own rows against
the columns of every rank, so the logits cost (local x global) instead of (global x global) memory. The loss a
rank returns is scaled so that the *mean over ranks* (what DDP's gradient averaging computes) equals the loss of
one process holding the whole global batch, in value and in gradient; ranks may hold different numbers of
samples, or none at all, for a pair.

Imports only torch so exported folders load with `trust_remote_code=True`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distributed_world_size() -> int:
    """Processes in the default group, or 1 when none is initialised."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate `tensor` from every rank along dim 0, keeping the gradient path to each rank's own rows.

    Ranks may hold different row counts (zero included). Returns the concatenation and the index at which this
    rank's rows start in it; a single process returns `tensor` itself and 0.
    """
    if distributed_world_size() == 1:
        return tensor, 0
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    counts = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([tensor.shape[0]], device=tensor.device))
    counts = [int(count.item()) for count in counts]
    padded = F.pad(tensor, (0, 0, 0, max(counts) - tensor.shape[0]))
    pieces = all_gather(padded)  # its backward sums every rank's gradient into each rank's own rows
    gathered = torch.cat([piece[:count] for piece, count in zip(pieces, counts, strict=True)])
    return gathered, sum(counts[: dist.get_rank()])


def contrastive_pair_loss(
    a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor | None, kind: str
) -> torch.Tensor | None:
    """Symmetric InfoNCE ("softmax") or SigLIP ("sigmoid") loss between matched rows of `a` and `b`.

    `a` and `b` are this rank's L2-normalised embeddings of the samples that have both modalities. Negatives
    are every other sample on every rank. Returns None when no rank has a single such sample.
    """
    world = distributed_world_size()
    gathered, offset = gather_with_grad(torch.cat([a, b], dim=1))  # one collective for both sides
    total = gathered.shape[0]
    if total == 0:
        return None
    all_a, all_b = gathered.split([a.shape[1], b.shape[1]], dim=1)
    scale = logit_scale.exp()
    logits_ab = scale * a @ all_b.T
    rows = torch.arange(a.shape[0], device=a.device)
    if kind == "sigmoid":
        targets = -torch.ones_like(logits_ab)
        targets[rows, rows + offset] = 1.0
        summed = -F.logsigmoid(targets * (logits_ab + logit_bias)).sum()
        return summed * world / total
    logits_ba = scale * b @ all_a.T
    summed = F.cross_entropy(logits_ab, rows + offset, reduction="sum")
    summed = summed + F.cross_entropy(logits_ba, rows + offset, reduction="sum")
    return summed * world / (2 * total)


def multiway_matching_loss(logits: torch.Tensor, allowed: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the classes a sample may take, with the probability of a *set* of correct classes.

    The matching head scores "matched" plus "text / vision / speech was swapped". A triplet's negative has one
    correct class; a two-modality sample's negative has two equivalent ones (swapping either side of a pair
    looks the same), so its probability is the sum over both. `allowed` and `target` are (n, classes) bool.
    """
    scores = logits.float()
    log_all = scores.masked_fill(~allowed, float("-inf")).logsumexp(dim=-1)
    log_target = scores.masked_fill(~target, float("-inf")).logsumexp(dim=-1)
    return (log_all - log_target).mean()


def span_mask(valid: torch.Tensor, ratio: float, span: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask about `ratio` of the True positions of `valid` (n, length) in runs of `span` (wav2vec2-style).

    Span starts are drawn with probability ratio / span; each start masks the next `span` positions.
    """
    if ratio <= 0:
        return torch.zeros_like(valid)
    draws = torch.rand(valid.shape, device=valid.device, generator=generator)
    starts = (draws < ratio / span) & valid
    spread = F.max_pool1d(F.pad(starts[:, None].float(), (span - 1, 0)), kernel_size=span, stride=1)[:, 0]
    return spread.bool() & valid


__all__ = ["contrastive_pair_loss", "gather_with_grad", "multiway_matching_loss", "span_mask"]
