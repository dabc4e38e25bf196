"""Thin DVC stage scripts: read params and inputs, call :mod:`mechdiff`, write outputs atomically."""
