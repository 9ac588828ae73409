"""Sockend: a trio-websocket bridge from browsers to mesh components."""
