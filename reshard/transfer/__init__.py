"""Moving bytes: byte sources, copy strategies, dtype casts and strided gathers."""
