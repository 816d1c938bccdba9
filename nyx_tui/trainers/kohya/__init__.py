"""sd-scripts backends: translation both ways, the runner."""
