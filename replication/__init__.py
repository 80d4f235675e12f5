"""The marflow experiment harness: tiers, configs from params.yaml, metrics, references, stages."""
