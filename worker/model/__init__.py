"""How a BLOOM checkpoint becomes tensors on devices.

- ``loading``: ``load_model(spec, device, dtype_policy)`` -> ``LoadedModel`` (model, tokenizer, device);
  ``pick_device``, ``pick_dtype``; a load failure is a ``ModelLoadError`` naming the checkpoint;
- ``sharding``: a rank's ``Shard`` of a model (heads, vocabulary rows) read straight from safetensors;
- ``group``: the tensor-parallel ``Group`` (collectives, rank 0's messages, ``GroupLost``);
- ``precision``: the dtype a worker computes in under ``auto``, and why (a CPU's native bf16, a GPU's bf16);
- ``quantize``: int8 and int4 weights with torchao (int8 activations too on a GPU);
- ``planner``: which GPUs hold a model, at which precision (plain Python: the launcher plans before torch);
- ``memory``: device memory (the KV budget, what is in use, giving memory back);
- ``tiny``: a tiny random BLOOM checkpoint with a trained tokenizer (``python -m worker.model.tiny DIR``).

Nothing is re-exported here, so that importing the planner does not import torch.
"""
