"""The data path, its imports running one way: corpus (the user's files, read in pieces) -> build (tokenized into
uint16 shards) -> cache (keyed by content, checked, read back memory-mapped) -> loader ((B, T) batches, torch).

Import from the modules themselves (gpt_exp.data.cache, gpt_exp.data.loader): `prepare` never loads torch.
"""
