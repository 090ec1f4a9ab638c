"""`python -m caitdeploy` (also `torchrun -m caitdeploy train ...`)."""
from .cli import main

main()
