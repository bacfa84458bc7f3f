"""xmodal: cross-modal (image + optical profile) plankton recognition on Ray."""

__version__ = "0.1.0"
