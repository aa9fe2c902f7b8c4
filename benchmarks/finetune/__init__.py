"""Fine-tuning pretrained bases: what a base's crops need to know of their place (issue 33)."""
