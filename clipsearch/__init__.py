"""clipsearch: find your photos by describing them."""

__version__ = "0.1.0"
