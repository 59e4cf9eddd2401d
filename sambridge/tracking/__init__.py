"""Video: every instance of a noun phrase tracked through a video as masklets, and counted once."""

from sambridge.tracking.masklets import Masklet, TrackResult
from sambridge.tracking.oracle import ClipDetector
from sambridge.tracking.tracker import ConceptTracker, FrameTracks, TrackedObject, TrackerConfig

__all__ = ["ClipDetector", "ConceptTracker", "FrameTracks", "Masklet", "TrackResult", "TrackedObject", "TrackerConfig"]
