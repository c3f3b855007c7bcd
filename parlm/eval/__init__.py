"""Evaluation (SPEC 5): `scoring` plain and sliding-window BPB, `ttt` score-first test-time
training, `token_mixture` a valid token-level NN + count mixture, `stage` the pipeline stage
`evaluate_run`, `plots` its figures. `python -m parlm.eval` runs the stage."""
