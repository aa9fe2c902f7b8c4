"""`latentpatch demo`: captioned crops of scikit-image's pictures (`images`), encoded, trained and sampled (`run`)."""
