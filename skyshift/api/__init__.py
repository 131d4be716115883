"""The API's Python side: kinds, conversion, validation, selectors and errors."""
