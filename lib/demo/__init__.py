"""The offline demo: a small trained teacher and a student with planted transforms."""
