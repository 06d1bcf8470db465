"""Model implementations and the Hugging Face folder loader."""
