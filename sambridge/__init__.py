"""sambridge: teach SAM2 noun phrases and distil SAM3's concept segmentation into a student."""

import warnings

__version__ = "0.1.0"

# Noise the sam2/sam3 packages print on import on machines without CUDA; nothing to act on.
warnings.filterwarnings("ignore", message="CUDA is not available or torch_xla is imported", category=UserWarning)
warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)
