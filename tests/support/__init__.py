"""Test helpers shared across test areas (a real coordinator, a fake silo)."""
