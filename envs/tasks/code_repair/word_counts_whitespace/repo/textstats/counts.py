"""Word frequencies."""


def word_counts(text):
    """How often each whitespace-separated word occurs, ignoring case."""
    counts = {}
    for word in text.lower().split(" "):
        counts[word] = counts.get(word, 0) + 1
    return counts


def most_common(text):
    """The most frequent word (the first one seen among ties), or None for no words."""
    counts = word_counts(text)
    return max(counts, key=counts.get) if counts else None
