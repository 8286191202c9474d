"""URL slugs from titles."""

import re


def slugify(title):
    """The lowercase words (letters and digits) of ``title`` joined by single hyphens."""
    words = re.findall(r"[A-Za-z0-9]+", title)
    return "-".join(words).title()
