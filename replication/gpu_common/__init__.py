"""The shared layer of the GPU tiers (SD 1.5, CIFAR-10), kept apart from ``replication.common`` so that
the CPU pipeline, whose DVC stages depend on ``replication/common``, is unaffected by it.

``accelerate_train`` (their one training loop on accelerate: mixed precision, accumulation, fp16
overflow skips, resumable checkpoints with the EMA, the step cost in the log), ``batches`` (global
batches and per-sample randomness independent of the process count) and ``ema`` (Rectified Flow's
weight EMA). The GPU tiers import it like ``replication.common``; it imports no tier.
"""
