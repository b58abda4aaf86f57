"""Tokenizer: BPE training, chat rendering and token shards."""
