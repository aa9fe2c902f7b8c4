"""Images of any shape: aspect buckets against centre cropping, on a mixed-shape set (issue 23)."""
