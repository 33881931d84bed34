"""Recall@k with repeated captions, on hand-built embeddings whose answers are worked out by hand: the strict
metric (only the query's own sample is a hit; tied scores broken at random, in expectation), the
duplicate-aware metric (any candidate with the query's caption is a hit) and the strict metric's ceiling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zidong.evaluation.retrieval import recall_at_k, retrieval_table
from zidong.models.zidong.configuration_zidong import MODALITIES


def _everywhere(embeddings: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    count = len(embeddings)
    return dict.fromkeys(MODALITIES, embeddings), {m: torch.ones(count, dtype=torch.bool) for m in MODALITIES}


def test_identical_embeddings_score_chance_not_a_hit() -> None:
    """Every candidate ties with the right one: a random order puts it first with probability 1/n."""
    embeds, presence = _everywhere(F.normalize(torch.ones(8, 4), dim=-1))
    metrics = recall_at_k(embeds, presence)
    assert metrics["text->vision/R@1"] == pytest.approx(1 / 8)
    assert metrics["text->vision/R@5"] == pytest.approx(5 / 8)
    assert metrics["text->vision/R@10"] == 1.0
    assert metrics["text->vision/median_rank"] == pytest.approx(4.5)  # the mean position among 8 tied
    captions = [f"caption {i}" for i in range(8)]
    assert recall_at_k(embeds, presence, captions)["text->vision/dup_R@1"] == pytest.approx(1 / 8)
    # all captions equal: any candidate is a right one
    assert recall_at_k(embeds, presence, ["same"] * 8)["text->vision/dup_R@1"] == 1.0


def _pairs_of(text: torch.Tensor, vision: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    count = len(text)
    embeds = {"text": text, "vision": vision, "speech": torch.zeros_like(text)}
    presence = {m: torch.ones(count, dtype=torch.bool) for m in ("text", "vision")}
    presence["speech"] = torch.zeros(count, dtype=torch.bool)
    return embeds, presence


# six samples with captions A A A B B C: a text is its caption's direction; an image is its caption's direction
# plus a small part of its own, which no caption says: a text scores all the images of its caption alike
CAPTIONS = ["A", "A", "A", "B", "B", "C"]
TEXT = torch.eye(3, 12)[[0, 0, 0, 1, 1, 2]]
VISION = F.normalize(TEXT + 0.1 * torch.eye(12)[3:9], dim=-1)


def test_repeated_captions_cap_the_strict_metric_at_its_ceiling() -> None:
    metrics = recall_at_k(*_pairs_of(TEXT, VISION), CAPTIONS)
    assert metrics["distinct_captions"] == 3
    for pair in ("text->vision", "vision->text"):
        # one query per caption can find its own sample first: 3 of 6; the ceiling says the same
        assert metrics[f"{pair}/R@1"] == pytest.approx(0.5)
        assert metrics[f"{pair}/ceiling_R@1"] == pytest.approx((3 * 1 / 3 + 2 * 1 / 2 + 1) / 6)
        assert metrics[f"{pair}/dup_R@1"] == 1.0
        assert metrics[f"{pair}/R@5"] == metrics[f"{pair}/ceiling_R@5"] == 1.0
    assert "speech->text/R@1" not in metrics  # no sample has speech


def test_duplicate_aware_recall_counts_only_the_query_caption() -> None:
    """Image 5 (caption C) looks like caption A: its query ranks the three A texts first (tied), then C's text
    tied with the two B texts, so C is within the first 5 unless both B texts come first: 1 - 2/3 * 1/2."""
    wrong = VISION.clone()
    wrong[5] = TEXT[0]
    metrics = recall_at_k(*_pairs_of(TEXT, wrong), CAPTIONS)
    assert metrics["vision->text/dup_R@1"] == pytest.approx(5 / 6)
    assert metrics["vision->text/dup_R@5"] == pytest.approx((5 + 2 / 3) / 6)
    assert metrics["vision->text/R@1"] == pytest.approx((3 * 1 / 3 + 2 * 1 / 2 + 0) / 6)


def test_without_ties_the_metrics_match_sorting() -> None:
    """Continuous random embeddings and captions repeated at random, against argsort of the scores."""
    generator = torch.Generator().manual_seed(0)
    count = 200
    text, vision = (F.normalize(torch.randn(count, 16, generator=generator), dim=-1) for _ in range(2))
    captions = [f"c{int(c)}" for c in torch.randint(0, 120, (count,), generator=generator)]
    metrics = recall_at_k(*_pairs_of(text, vision), captions)
    order = torch.argsort(text @ vision.T, dim=1, descending=True)
    for k in (1, 5, 10):
        top = order[:, :k]
        strict = (top == torch.arange(count)[:, None]).any(dim=1).float().mean()
        duplicate = torch.tensor([any(captions[j] == captions[i] for j in top[i].tolist()) for i in range(count)])
        assert metrics[f"text->vision/R@{k}"] == pytest.approx(float(strict))
        assert metrics[f"text->vision/dup_R@{k}"] == pytest.approx(float(duplicate.float().mean()))
    ranks = (order == torch.arange(count)[:, None]).float().argmax(dim=1) + 1
    assert metrics["text->vision/median_rank"] == float(ranks.float().median())


def test_without_repeated_captions_both_metrics_agree_and_the_ceiling_is_1() -> None:
    generator = torch.Generator().manual_seed(1)
    text, vision = (F.normalize(torch.randn(50, 16, generator=generator), dim=-1) for _ in range(2))
    metrics = recall_at_k(*_pairs_of(text, vision), [f"c{i}" for i in range(50)])
    for k in (1, 5, 10):
        assert metrics[f"text->vision/dup_R@{k}"] == metrics[f"text->vision/R@{k}"]
        assert metrics[f"text->vision/ceiling_R@{k}"] == 1.0
    # samples without a caption are only their own match, and are no caption
    uncaptioned = recall_at_k(*_pairs_of(text, vision), [None] * 50)
    assert uncaptioned["text->vision/dup_R@1"] == metrics["text->vision/R@1"]
    assert uncaptioned["text->vision/ceiling_R@1"] == 1.0
    assert uncaptioned["distinct_captions"] == 0


def test_the_table_shows_duplicate_aware_recall_and_the_ceiling() -> None:
    table = retrieval_table(recall_at_k(*_pairs_of(TEXT, VISION), CAPTIONS))
    header, first = table.splitlines()[:2]
    assert header.split() == ["pair", "R@1", "R@5", "R@10", "median", "ceil@1", "dup@1", "dup@5", "dup@10"]
    assert first.split() == ["text->vision", "0.500", "1.000", "1.000", "1.5", "0.500", "1.000", "1.000", "1.000"]
    assert "6 samples, 3 distinct captions" in table
    # metrics without captions (older runs' records) keep the strict table
    assert "dup@1" not in retrieval_table(recall_at_k(*_pairs_of(TEXT, VISION)))
