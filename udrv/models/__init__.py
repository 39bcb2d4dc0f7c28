"""In-process device models (the device side of the wire) for tests and the demo."""
