"""sambridge: teach SAM2 noun phrases and distil SAM3's concept segmentation into a student."""

__version__ = "0.1.0"
