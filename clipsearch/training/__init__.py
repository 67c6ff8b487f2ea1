"""Training a CLIP contrastively (`clipsearch train`): kept apart from the search engine, which
never imports it.

This module imports nothing, so that registering the command (``training.command``) costs the
CLI's start-up no torch.
"""
