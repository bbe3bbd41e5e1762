"""LoRA-DA: data-aware initialization for LoRA."""
