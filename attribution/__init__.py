"""attribution package (see ARCHITECTURE.md)."""
