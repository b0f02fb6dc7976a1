"""The shared training skeleton of train/train_get.py and train/train_dmd.py; the scripts keep only their loops.

One concern per module:

- ``get.training.checkpoints``: the run folder, atomic checkpoints with exact resume (modules, optimizers, RNG and
  loop state), the RNG state of a process.
- ``get.training.modules``: unwrapping DDP/compile wrappers, freezing, EMA, the DDP consistency check.
- ``get.training.logs``: stats.jsonl and TensorBoard, the loss curve, a throughput meter.
- ``get.training.guards``: the non-finite update guard (one per kind of update).
- ``get.training.cli``: the command-line options the scripts share, their range checks, ``UserError`` and the entry
  point that ends a user error with one line.
- ``get.training.pairs``: the pair set's identity in checkpoints and its resume check, the non-finite pair scan.

Images and grids are ``get.images``; seeds are ``get.seeds``; the pairs' data order is ``get.data.micro_batches``.
"""
