"""`tridentloop bench`: one module per benchmark. Each prints JSON lines with a ratio
against a baseline run side by side in the same process (or the same machine), because
absolute times mean nothing across machines. Nothing here imports the CLI.
"""
