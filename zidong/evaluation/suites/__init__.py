"""zidong models driven from the side of the evaluation suites labs already run (docs/evaluation.md).

- `clip`: an open_clip-style model (`encode_image`, `encode_text`, `encode_audio`), tokenizer and transform, the
  loader CLIP_benchmark takes (`--model_type zidong`), and CLIP_benchmark's WebDataset layout written from a
  shard folder.
- `xares`: `ZidongEncoder`, the speech tower as X-ARES's audio encoder (frame-level `[B, T', D]`).
- `hear`: the HEAR 2021 API (`load_model`, `get_scene_embeddings`, `get_timestamp_embeddings`).
- sentence-transformers reads the text tower that `zidong export --towers` writes (zidong/export/folders.py).

None of the suites' packages is imported here: each is needed only by the suite that runs the model.
"""
