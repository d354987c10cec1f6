"""Conventions every stage shares: channel and landmark layouts, errors, devices and precision, image conversions, progress."""
