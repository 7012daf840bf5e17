"""Side-by-side measurements (see each script's docstring); importable so they share parts."""
