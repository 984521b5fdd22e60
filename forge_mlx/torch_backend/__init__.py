"""The forge-mlx pipeline on PyTorch (MPS, else CUDA, else CPU) for machines where MLX does not run.

Module for module like the MLX side, writing the same run directory: the same adapter names and layouts,
the same residual bytes (NF4 as bitsandbytes, affine as mx.quantize), the same init draws (MLX's RNG in
numpy), the same metrics and checkpoints, so export, eval and load_run work on a torch run. Nothing here
imports mlx.
"""


def uses_torch(backend: str) -> bool:
    """Whether a run with this `backend` setting trains on torch: "torch", or "auto" where mlx does not
    import."""
    if backend != "auto":
        return backend == "torch"
    try:
        import mlx.core  # noqa: F401
    except ImportError:
        return True
    return False
