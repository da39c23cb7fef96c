"""Everything that knows about the Hugging Face Hub and local model folders: resolving a
spec to files, publishing, the model card."""
