"""`python -m caitdeploy` (also `torchrun -m caitdeploy train ...`)."""

from caitdeploy.cli.main import main

main()
