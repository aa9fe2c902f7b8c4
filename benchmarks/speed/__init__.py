"""Speed to quality: patch training against full-size training, in measured training seconds (`to_quality`),
and what the small-store guard buys (`guard_defaults`)."""
