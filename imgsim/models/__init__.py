"""Models: the autoencoder, imported and pretrained encoders behind the one `Encoder` interface, and the feature teachers."""
