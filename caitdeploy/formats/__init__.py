"""The files caitdeploy reads and writes: format names and key layout, checkpoints, fused files, and `describe`
(what a file is, for `inspect`)."""
