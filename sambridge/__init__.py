"""sambridge: teach SAM2 noun phrases and distil SAM3's concept segmentation into a student."""

import warnings

__version__ = "0.1.0"

# sam3 warns on import, on machines without CUDA, about its own code: nothing to act on. Ignored for everyone
# who imports sambridge (library users too, since any sambridge model imports sam3), as narrowly as Python
# allows: the autocast one only from sam3's modules; the TorchScript one (torch warns, from sam3's
# @torch.jit.script functions) by its message. Lightning's noise is dropped only by the CLI (cli.quiet_known_noise).
warnings.filterwarnings("ignore", message="CUDA is not available or torch_xla is imported", category=UserWarning,
                        module=r"sam3\.")
warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)
