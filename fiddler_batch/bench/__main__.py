"""`python -m fiddler_batch.bench`: the same command as `fiddler-batch bench`."""

from fiddler_batch.bench.cli import bench

if __name__ == "__main__":
    bench(prog_name="python -m fiddler_batch.bench")
