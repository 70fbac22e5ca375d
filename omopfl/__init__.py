"""omopfl: train shared models across OMOP CDM sites without moving a patient row."""

__version__ = "0.1.0"
__all__ = ["__version__"]
