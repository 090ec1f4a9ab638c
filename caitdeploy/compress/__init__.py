"""CAIT compression for deployment: pure tensor surgery, CDCP channel selection, fusing a checkpoint into a
deploy model, and the float64 references every fuse is verified against."""
