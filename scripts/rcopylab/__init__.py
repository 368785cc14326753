"""The two-VM qemu lab: real device-mapper, kernel NBD and a real link for rcopy's lab tests.

scripts/lab is its command line, tests/lab/conftest.py its pytest face; both drive :class:`rcopylab.labctl.Lab`.
"""
