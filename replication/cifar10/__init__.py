"""CIFAR-10 tier (GPU, paper protocol): flow-matching teacher, reflow / PeRFlow +- MA students, 50k FID.

``python -m replication.cifar10.run --params PARAMS.yaml --stage teacher|pairs|students|fid``.
"""
