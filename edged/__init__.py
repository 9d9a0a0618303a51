"""edged: an inference daemon for small Linux devices (TFLite models over MQTT)."""
__version__ = "0.1.0"
