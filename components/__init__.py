"""Conveyor's TFX components, one folder each (component.py, executor.py, README.md)."""
