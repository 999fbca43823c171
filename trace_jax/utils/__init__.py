"""Small helpers that are not part of the model stack (pictures of attribution maps)."""
