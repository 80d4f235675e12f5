"""CIFAR-10 tier (GPU, paper protocol): flow-matching teacher, reflow / PeRFlow +- MA students, 50k FID.

Stages (``stages.py``): ``python -m replication.stage cifar10_teacher|cifar10_pairs|cifar10_students|cifar10_fid``,
with the ``cifar10*`` sections of ``replication/gpu/params.yaml``.
"""
