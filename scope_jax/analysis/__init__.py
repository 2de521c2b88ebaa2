"""What researchers do with trained SAEs next: matching latents across layers and widths
(`scope-jax match`), and the parent-child splits the feature browser shows."""
