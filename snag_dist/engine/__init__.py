"""Training engine: backends (Accelerate, DeepSpeed), the loop, checkpoints. Tasks never see which backend runs."""
