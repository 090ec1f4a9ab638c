"""Live serving on Triton Inference Server: start a server on a repository, load-test it."""
