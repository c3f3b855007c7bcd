"""Quantization (SPEC 4): `gptq` Hessians and GPTQ with SDClip, `artifact` packing, compression
and the way back to a model, `stage` the pipeline stage `quantize_run`, `stats` per-tensor
error statistics, `plots` its figures. `python -m parlm.quant` runs the stage."""
