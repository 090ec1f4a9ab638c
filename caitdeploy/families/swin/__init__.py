"""The Swin family: config, deploy model, FLOPs and key layout (`model`)."""
