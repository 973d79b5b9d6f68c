"""The HTTP surface: thin handlers over ``keepstore.store``."""
