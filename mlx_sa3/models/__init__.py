"""The networks of Stable Audio 3 in MLX, free of backend and platform concerns: DiT (+ its CPU kernels and the
backend-neutral step), SAME, T5Gemma and its tokenizer, the conditioners, and the official <-> diffusers key maps."""
