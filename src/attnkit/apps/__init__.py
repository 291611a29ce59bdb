"""Applications built on attnkit's layers; the CLI is a thin shell over these."""
