"""Model components (real diffusers/transformers classes) built from presets or loaded from a directory.

`config` (ModelConfig, light), `presets` (architectures), `tokenizer` (offline CLIP BPE), `components`
(build/load/save), `fingerprint` (encoder identity for caches).
"""
