"""moekit.kernels: Triton MoE kernels (leaf layer: torch + triton only, triton optional)."""
