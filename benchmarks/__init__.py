"""One script per question; JSON lines out, plots drawn from the JSON."""
