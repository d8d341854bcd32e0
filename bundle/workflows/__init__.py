"""Workflow helpers used by the stage configs: resumable checkpointing, classification pieces, distributed helpers."""
