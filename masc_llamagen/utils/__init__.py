"""Shared helpers at the bottom of the house: atomic writes, uint8 images, devices, provenance."""
