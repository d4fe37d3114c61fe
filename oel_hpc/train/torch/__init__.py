"""trainer=torch: the consolidation backend on Hugging Face models, DDP or FSDP2 (``trainer.py``)."""
