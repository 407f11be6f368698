"""Tokenizers behind one interface (base.py): sentencepiece models (sentencepiece.py) and
HuggingFace tokenizer.json files (hf.py), plus writing and reading HF tokenizer folders
(hf_export.py)."""
