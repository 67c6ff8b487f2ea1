"""Bundled CLIP: model, tokenizer, preprocessing, checkpoint loading."""
