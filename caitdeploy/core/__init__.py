"""The bottom layer: one error contract, all-or-nothing outputs, memory budgets and bounded readers of untrusted
files (pickles, safetensors, images), and rendering of untrusted strings. Imports nothing else of caitdeploy."""
