"""The model (SPEC 2): `gpt` the PR #1858 GPT, `attention` its interchangeable attention kernels,
`plots` the tables and figures of notebook 02."""
