"""omopfl."""
