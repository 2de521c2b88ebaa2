"""The first stage: text sources (files, gs://, Hugging Face, the builtin Python corpora), the
tokenizer, and packing token streams into fixed-length sequences."""
