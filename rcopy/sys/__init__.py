"""Wrappers around every external tool and kernel interface; the only code that touches them."""
