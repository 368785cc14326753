"""The command line: one module per noun, one error funnel in main.py."""
