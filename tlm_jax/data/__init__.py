"""Data: tokenizers, TFDS builders (built-in corpus, local files) and the Grain pipeline."""
