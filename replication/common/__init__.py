"""The shared layer between the harness and the tiers: what every tier builds on.

``students`` (one student spec), ``methods`` (one method record per method, resolved by name),
``stats`` (Monte-Carlo estimates, seed intervals, paired deltas), ``fingerprint`` (the code a run
depends on, by import closure), ``runs`` (run folders resumable only by the same fingerprint).
Tiers import this layer, the harness and the core, never another tier.
"""
