"""Data stages: synth (demo data), ingest (manifest + groups), split (without leakage).

Kept import-free so that ingest's worker processes start fast.
"""
