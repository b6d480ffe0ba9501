"""Layout-free checkpoints on ``torch.distributed.checkpoint`` (DCP).

Each rank saves the N-d boxes it owns of every global tensor (``zero/state.py``: fp32 masters and
AdamW moments; replicated boxes once) and loads the boxes its own layout needs, whatever layout
saved them: DCP's planner intersects the saved chunks with the wanted ones. ``planners.py`` turns
boxes into DCP write/read items; ``storage.py`` reads ``.metadata`` through an unpickler that
admits only DCP's metadata classes and checks a CRC-32 per stored item; ``sharded.py`` is the
save/load entry point; ``async_save.py`` writes while training goes on; ``files.py`` finds and
checks a checkpoint directory's files. Non-tensor state lives in the checkpoint's JSON manifest
(meta.json), never in the DCP state dict, so no pickled bytes item exists to load.
"""
