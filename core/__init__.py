"""The ground every layer stands on: the wire format, the config object and its start-up
document, exit codes, command-line argument types, logging. No numpy-heavy or device code:
the front, the workers and the tools all import it."""
