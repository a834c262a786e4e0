"""clipreel: video recognition on frozen CLIP features."""

__version__ = "0.1.0"
