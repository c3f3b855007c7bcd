"""Training (SPEC 3): `loop` the timed training loop and the stage `train_run`, `trainer` one
optimizer step and the compile warmup, `optim` MuonEq-R + AdamW and the schedules, `state` EMA /
warmup snapshot / timing / the loop state, `checkpoint` resumable training, `checks` what must
hold before training starts (and restarting a seed's training), `plots` its curves.
`python -m parlm.train` runs the stage."""
