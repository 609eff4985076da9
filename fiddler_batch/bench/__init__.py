"""The benchmark suite (`fiddler-batch bench`): the paper's scenarios and offline throughput, against baselines in
one run.

- `settings`: scenarios, sizes and run settings; `model`: the benchmark model and tokenizer;
- `baselines`: the placements of the model; `scenarios`: one timed call of each scenario;
- `bounds`: the physical bound of each case; `suite`: runs a session; `results`, `report`: the files it writes;
- `throughput`: scenario e through the job runner; `checkpoints`: the checkpoints it writes; `hostmemory`: this
  process's host memory, for `benchmarks/memory.py` and the memory tests;
- `cli`: the `bench` command.
"""
