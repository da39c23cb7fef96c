"""Spreading a model over several GPUs: pipeline and tensor-parallel plans, memory
estimates, device maps, and split/merge of per-GPU checkpoints.

Modules, in the order data flows through them:

- ``arch``: the vocabulary of the family tables (cut kinds, ``Rule``, ``Family``).
- ``families``: one small table per architecture family (which tensors are cut how),
  and the fallback to transformers' ``base_model_tp_plan``.
- ``modelconfig``: the numbers of config.json the estimates need.
- ``pipeline``: whole layers per GPU, stages balanced by bytes (pure).
- ``tensor``: how every tensor is cut (heads, replicated KV heads, fused projections,
  experts split or placed), per-rank ``TensorInfo`` extents and the ``tp_plan.json``
  records merge inverts (pure).
- ``memory``: per-GPU weights + KV cache + activations (pure).
- ``devicemap``: a pipeline plan as a transformers/accelerate ``device_map``.
- ``planner``: the ``reshard plan`` job (read headers + config, estimate).
- ``split_parallel``: ``reshard split --tp/--pp`` (streams, atomic like ``split``).
- ``merge``: ``reshard merge``: back to one ordinary checkpoint (streamed).
"""
