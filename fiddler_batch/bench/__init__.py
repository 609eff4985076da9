"""The benchmark suite (`fiddler-batch bench`): the paper's scenarios and offline throughput, against baselines in
one run.

- `settings`: scenarios, sizes and run settings; `model`: the benchmark model and tokenizer;
- `baselines`: the four placements of the model; `scenarios`: one timed call of each scenario;
- `bounds`: the physical bound of each case; `suite`: runs a session; `results`, `report`: the files it writes;
- `cli`: the `bench` command.
"""
