"""BrainG3N tokenizers (MAE-CNN, AutoencoderKL baseline), registry, latents shards."""
