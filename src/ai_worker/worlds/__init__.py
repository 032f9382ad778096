"""A world's shared state: its plan (counts and predictions), its status document (the one the platform
reads) and its generated description. One module owns each collection."""
