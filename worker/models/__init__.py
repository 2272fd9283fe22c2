"""The model layer: one `Encoder` protocol, one small class per model family."""
