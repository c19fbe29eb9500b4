"""Training: objectives, augmentations and the recipes that choose them (the Ray Train loop is `pipelines.train`)."""
