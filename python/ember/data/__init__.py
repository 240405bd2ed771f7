"""Token shards and the training data loader.

``ShardWriter`` writes Ember shards; ``open_dataset`` reads Ember, Megatron
``.bin/.idx`` and llm.c shards; ``TokenLoader`` turns any mix of them into
batches of fixed-length samples in a seeded, world-size-independent order.
"""

from ember._native import ShardFormatError
from ember.data.loader import TokenLoader
from ember.data.prepare import PrepareError, prepare
from ember.data.shards import ShardWriter, TokenDataset, check_vocabulary, open_dataset

__all__ = ["PrepareError", "ShardFormatError", "ShardWriter", "TokenDataset", "TokenLoader", "check_vocabulary", "open_dataset", "prepare"]
