"""Raspberry Pi side: read meter pulses from GPIO, count them durably, publish them."""
