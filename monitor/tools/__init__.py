"""Demos, scenario trainings and benchmark harnesses: not the monitor's core; the CLI imports
them lazily."""
