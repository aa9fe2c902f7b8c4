"""The encode stage: an image folder -> a latent store (`encode.py`), with its one options object (`options.py`)."""
