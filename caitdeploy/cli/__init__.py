"""The command line: one thin module per command (parse options, call one pipeline, print); `main` holds the
click group."""
