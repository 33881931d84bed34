"""Evaluation: one owner for every metric.

- `retrieval`: held-out embeddings of every modality, Recall@k and median rank for every pair and direction, the
  held-out table (used by pretraining, retrieval fine-tuning, `zidong eval` and model cards);
- `classification`: a fine-tuned classifier's held-out accuracy;
- `zero_shot`: `zidong eval`, zero-shot classification of images and speech from label prompts.
"""
