"""Tests of the AuthN emulator: the official SDK, Pangea's OpenAPI spec, and injected faults."""
