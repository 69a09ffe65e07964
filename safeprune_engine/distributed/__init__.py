"""Training on many ranks: DeepSpeed ZeRO for the student, a ZeRO-3-sharded frozen teacher, plain DDP.

    safeprune run ... --launcher torchrun|deepspeed --nproc N --zero-stage 0|1|2|3 [--teacher-zero3]

The run layer (safeprune_engine.run) starts the ranks (run/launcher.py) and builds the engine on every rank with its
one builder, through the hooks of run/session.py's DistributedSession; this package holds what ranks are made of:
- runtime.py: rank set-up (gloo on CPU, NCCL on CUDA), this rank's device, the few collectives used.
- engine.py: each rank computes its rows of the global batch; loss values are global means.
- solver.py: every solver unchanged, through a mixin (ZeRO: one DeepSpeed engine whose client optimizer holds all of
  the solver's optimizers; stage 0: gradient averaging before each optimizer step).
- slot_optimizer.py: the solver's optimizers as slots of one torch optimizer.
- zero_config.py: DeepSpeed configs of the student and the teacher.
- zero_state.py: whole weights and optimizer states of ZeRO partitions, for checkpoints and export.
- teacher.py: the frozen teacher as an optimizer-less ZeRO-3 engine.

Importing this package imports neither deepspeed nor diffusers.
"""
