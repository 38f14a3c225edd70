"""Files: model folders, run folders, LoRA files, videos, the loss plot."""
