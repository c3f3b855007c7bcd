"""Training (SPEC 3): `loop` the timed training loop and the stage `train_run`, `optim` MuonEq-R +
AdamW and the schedules, `state` EMA / warmup snapshot / timing, `checks` what must hold
before training starts, `plots` its curves. `python -m parlm.train` runs the stage."""
