"""What every adapter shares above the sans-IO layers: the facade an application calls."""
