"""The ViT family (timm VisionTransformer / DeiT): its config (`config`), deploy model (`model`) and resizing."""
