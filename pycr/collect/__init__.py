"""What is read from a frozen tree: tree, task cores, address spaces, memory, files.

Each module reads one kind of state and returns plain dicts shaped like the
image schemas in pycr.formats, so the dump only has to write them.
"""
