"""Text conditioning's encoders, one module each: `config` (the run's text section), `identity` (which encoder a
record names; the one comparison of records), `open_clip_encoder` (a frozen open_clip tower, and the interface
every encoder has), `pipeline_encoder` (a diffusers pipeline's own CLIP text model), `loader` (the one loader that
chooses between them) and `cache` (embeddings kept in the latent store)."""
