"""The fine-tuning loop: mlx-lm LoRA on the dataset, evaluation, promotion gate, publishing.

Nothing here imports MLX at module level: the service starts training as a child process
(:mod:`.job`), and only the runner's child and the MLX classifier load it.
"""
