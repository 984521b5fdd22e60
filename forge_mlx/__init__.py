"""forge-mlx: PiSSA fine-tuning over a 4-bit residual, native to Apple Silicon (MLX)."""

from forge_mlx import fastblas as _fastblas

_fastblas.preload()  # must precede any `import mlx.core`

__version__ = "0.1.0"
