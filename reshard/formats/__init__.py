"""Readers, one per input format, each turning files into ``TensorInfo`` descriptors."""
