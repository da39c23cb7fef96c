"""reshard: stream large checkpoints into size-bounded safetensors shards with flat memory.

The library is usable from Python; the ``reshard`` CLI is a thin layer over it::

    from reshard.split import split_checkpoint
    result = split_checkpoint("./my-model", "./my-model-2GB", max_shard_size=2 * 10**9)
"""

__version__ = "0.1.0"
