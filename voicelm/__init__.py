"""voicelm: end-to-end spoken dialogue models in the style of GLM-4-Voice."""

__version__ = "0.1.0"
