"""Models: loading (diffusers folders, single files, built-in tiny ones), LoRA, ControlNet and its hints."""
