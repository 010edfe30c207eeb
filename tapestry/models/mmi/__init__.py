"""MM-Interleaved (`mmi`): image encoder + perceiver resampler, an LLM with MMFS every k-th
layer, and a UNet image decoder conditioned on resampled LLM states (DESIGN §5.3)."""
