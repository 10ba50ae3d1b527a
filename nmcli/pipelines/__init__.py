"""Pipelines that run the algorithms over whole models: in memory, block by block with error
propagation, streamed from the shards of an HF directory, SAD between any inputs, and the SR-STE
training loop (single process or DDP under torchrun)."""
