"""The package's version, in a module of its own so that the cards and the score log read it without importing the
package's ``__init__`` from below."""

__version__ = "0.1.0"
