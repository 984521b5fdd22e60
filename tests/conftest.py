import forge_mlx  # noqa: F401  (preloads the fast BLAS before mlx is imported)
