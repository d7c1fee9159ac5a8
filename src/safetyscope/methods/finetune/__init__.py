"""Targeted fine-tuning of the refusal circuit's components: weaken or harden refusal (``api.finetune``)."""
