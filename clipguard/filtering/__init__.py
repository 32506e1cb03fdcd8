"""Scores + gamma -> decisions: `filter` writes clean and quarantine shards, `gate` judges a
dataset against a flagged-rate policy. A pair is flagged when its cosine distance >= gamma.

- `threshold`: gamma from --gamma or a calibration file, checked against the scoring model
- `scores`: reuse or compute score files, and join score rows back to samples by position
- `decide`: one scored sample -> kept / flagged / errored, with a reason
- `run`: the filter (per-input-shard outputs, atomic, resumable, with a manifest)
- `gate`, `gate_report`: the CI gate and its text / JSON / Markdown reports
"""
