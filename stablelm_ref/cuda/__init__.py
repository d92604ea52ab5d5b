"""Raw CUDA kernels (*.cu) and the small Python that loads and launches them through CuPy."""
