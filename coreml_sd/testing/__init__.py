"""Helpers for tests, benchmarks and the offline demo: tiny diffusers pipelines with random
weights built from configs, and CLIP's tokenizer files built from the BPE list that
``open_clip_torch`` ships. Nothing here is used to convert or run a real model."""
