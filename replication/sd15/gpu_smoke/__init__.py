"""``gpu_smoke``: one command that measures what the SD 1.5 tier costs on one GPU, offline.

``python -m replication.sd15.gpu_smoke --size full --out results/gpu/smoke.json`` builds SD-1.5-shaped
components with random weights (the published UNet, VAE and text-encoder configs, ``sd15_config/``)
and a random 512-px caption folder, then measures with the tier's own trainer, stage runner and
evaluator: seconds per step and peak memory (``training``), a kill and resume and the checkpoint
size (``resume``), sampling throughput (``generation``) and the finite-difference divergence against
its VJP estimate (``divergence``). The report (``report.SmokeReport``) is what
``python -m replication.sd15.gpu_smoke.cost_table`` turns into the cost table of ``docs/gpu.md``.
``--size tiny`` runs the same code on the CPU stand-ins of ``replication.sd15.tiny`` (the tests).
"""
