"""Fine-tuning: `finetune` (`lp.finetune`), its starting points (`starting_points`: an own run or a pretrained
base made ready to train) and the diffusers bases themselves (`diffusers_bases`: hub ids, model and pipeline
folders)."""
