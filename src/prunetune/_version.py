"""The package version (read by setuptools and recorded in every manifest)."""

__version__ = "0.1.0"
